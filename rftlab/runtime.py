"""Device, precision, compilation, threads and seeding.

``device="auto"`` picks CUDA when present, else CPU. ``precision="auto"`` trains under bf16 autocast on a CUDA
device that supports bf16 and in fp32 everywhere else (:func:`select_precision`); ``compile`` wraps a model's
forward with ``torch.compile`` (:func:`maybe_compile`, off by default). Seeding fixes Python's, NumPy's and
torch's generators, so the same seed gives the same metrics on CPU.

What has run where: every path here is exercised on CPU (the selection logic by ``tests/test_runtime.py``, with
CUDA faked) and on one H100 by ``tests/test_cuda.py`` (``pytest -m gpu``): bf16 autocast and ``torch.compile``
agree with fp32 eager there, and at the experiments' model sizes neither makes runs faster (README, "Scale-out
and GPUs").
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

from rftlab.errors import RftlabError


def resolve_device(requested: str = "auto") -> str:
    """Return ``"cuda"`` or ``"cpu"``; asking for an unavailable CUDA is a user error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RftlabError(
                f"--device {requested} requested but torch {torch.__version__} sees no CUDA device; "
                "use --device cpu or install a CUDA build of torch."
            )
        return requested
    raise RftlabError(f"unknown device {requested!r}: use auto, cpu or cuda.")


PRECISIONS = ("auto", "fp32", "bf16")


def select_precision(requested: str, device: str) -> str:
    """``"bf16"`` or ``"fp32"``: the autocast precision of training forwards on ``device``.

    ``auto`` is bf16 on a CUDA device with native bf16 (Ampere and newer; ROCm), fp32 otherwise: bf16 keeps
    fp32's exponent range, so no loss scaling is needed, while older GPUs and most CPUs only emulate it (slower
    than fp32). ``bf16`` on a CUDA device without native bf16 is a user error; on CPU it is allowed (CPU
    autocast), for testing.
    """
    if requested not in PRECISIONS:
        raise RftlabError(f"unknown precision {requested!r}: use {', '.join(PRECISIONS)}.")
    cuda = device.startswith("cuda")
    if requested == "fp32":
        return "fp32"
    import torch

    supported = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "bf16" and cuda and not supported:
        raise RftlabError(f"--precision bf16 requested but {device} has no native bf16; use --precision fp32.")
    if requested == "bf16":
        return "bf16"
    return "bf16" if supported else "fp32"


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The context that training steps run in: ``torch.autocast`` to bf16 for ``precision="bf16"`` (linear layers
    and matmuls in bf16; softmax, layer norm and losses in fp32 by autocast's op lists; rftlab's response
    log-probs come from fp32 logits; parameters, gradients and optimizer state keep their own dtype), nothing
    for fp32. Gradient diagnostics (inner products of per-pair gradients, gradient-norm
    estimates) are not run under it: they compare small differences that bf16's 8-bit mantissa would blur."""
    if precision != "bf16":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def maybe_compile(module: Any, enabled: bool) -> Any:
    """Compile ``module``'s forward in place with ``torch.compile`` (``nn.Module.compile``: the module keeps its
    class, attributes and state-dict keys, so code that inspects it is unaffected) when ``enabled``; compilation
    itself happens lazily at the first call. ``dynamic=True``: sequence lengths change from batch to batch."""
    if enabled:
        module.compile(dynamic=True)
    return module


def check_torch_for_transformers() -> None:
    """A one-line error when the installed transformers cannot use the installed torch.

    transformers 5 needs torch ≥ 2.6; beside an older torch it imports but switches its PyTorch support off, and
    the models then fail later with errors that do not name the cause."""
    from transformers.utils import is_torch_available

    if not is_torch_available():
        import torch
        import transformers

        raise RftlabError(f"transformers {transformers.__version__} does not work with the installed torch "
                          f"{torch.__version__}: pip install 'transformers<5', or a torch ≥ 2.6.")


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (0 = torch's default). Tiny models often run fastest on 1."""
    import torch

    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
