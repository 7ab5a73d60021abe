"""Device, threads and seeding.

``device="auto"`` picks CUDA when present, else CPU. Seeding fixes Python's, NumPy's and torch's
generators, so the same seed gives the same metrics on CPU.
"""

from __future__ import annotations

import os
import random

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
