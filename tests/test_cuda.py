"""The CUDA path, on a machine with a GPU (``pytest -m gpu``; deselected by default, and skipped without CUDA).

What it checks: the device and precision that ``auto`` selects there; that the model's log-probs, bf16 autocast
and ``torch.compile`` on the GPU agree with fp32 on the CPU to float tolerance; that seeded sampling on the GPU
is reproducible and well-formed; and that `grue` and `margin-losses` smoke runs complete on the GPU in bf16 and
with ``--compile``, recording the precision they trained in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_rftlab

from rftlab import runtime
from rftlab.models import LMConfig, build_model
from rftlab.rl.sampling import response_forward, sample
from rftlab.tokenization import train_bpe_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = ["the cat sat on the mat", "a dog ran far away from the cat", "one two three four five six seven"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def cpu_model(tok):
    torch.manual_seed(0)
    return build_model(LMConfig(n_layer=2, n_embd=64, n_head=2, n_positions=64), tok).eval()


def _batch(seed: int = 0):
    """4 left-padded prompts and right-padded responses of mixed lengths (ids ≥ 2)."""
    gen = torch.Generator().manual_seed(seed)
    pm = (torch.arange(6) >= 6 - torch.tensor([6, 2, 4, 5])[:, None]).long()
    rm = (torch.arange(9) < torch.tensor([9, 3, 7, 1])[:, None]).long()
    return (torch.randint(2, 300, pm.shape, generator=gen) * pm, pm,
            torch.randint(2, 300, rm.shape, generator=gen) * rm, rm)


def test_auto_selects_cuda_and_bf16_on_a_gpu_with_native_bf16() -> None:
    assert runtime.resolve_device("auto") == "cuda"
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert runtime.select_precision("auto", "cuda") == ("bf16" if native else "fp32")


def test_logprobs_on_the_gpu_equal_the_cpu_and_bf16_stays_close(cpu_model) -> None:
    import copy

    batch = _batch()
    expected = response_forward(cpu_model, *batch).logprobs
    gpu_model = copy.deepcopy(cpu_model).cuda()
    on_gpu = [t.cuda() for t in batch]
    fp32 = response_forward(gpu_model, *on_gpu).logprobs.cpu()
    torch.testing.assert_close(fp32, expected, atol=2e-4, rtol=1e-4)
    with runtime.autocast("cuda", "bf16"):
        bf16 = response_forward(gpu_model, *on_gpu).logprobs.float().cpu()
    mask = batch[3].bool()
    assert (bf16[~mask] == 0).all()
    # bf16 matmuls carry an 8-bit mantissa: token log-probs of order −6 move by a few hundredths
    assert (bf16[mask] - expected[mask]).abs().max() < 0.1


def test_compiled_model_equals_eager_on_the_gpu(cpu_model) -> None:
    import copy

    eager = copy.deepcopy(cpu_model).cuda()
    compiled = runtime.maybe_compile(copy.deepcopy(cpu_model).cuda(), True)
    for seed in (0, 1):  # a second shape: dynamic=True compiles once for both
        on_gpu = [t.cuda() for t in _batch(seed)]
        torch.testing.assert_close(response_forward(compiled, *on_gpu).logprobs,
                                   response_forward(eager, *on_gpu).logprobs, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_on_the_gpu_is_reproducible_and_well_formed(cpu_model, tok) -> None:
    import copy

    model = copy.deepcopy(cpu_model).cuda()
    prompts = ["the cat", "a dog ran", "one two"]
    first = sample(model, tok, prompts, 4, max_new_tokens=8, seed=3)
    again = sample(model, tok, prompts, 4, max_new_tokens=8, seed=3)
    assert torch.equal(first.response_ids, again.response_ids)
    assert first.response_ids.shape[0] == 12 and first.response_ids.device.type == "cuda"
    lengths = first.response_mask.sum(1)
    assert ((lengths >= 1) & (lengths <= 8)).all()
    assert torch.isfinite(first.logprobs[first.response_mask.bool()]).all()
    assert (first.logprobs[first.response_mask.bool()] <= 0).all()


def _meta(proc) -> tuple[Path, dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.strip().splitlines()[-1])
    return folder, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("extra", [[], ["--precision", "fp32", "--compile"]], ids=["auto", "fp32-compile"])
def test_grue_smoke_runs_on_the_gpu(tmp_path: Path, extra: list[str]) -> None:
    import pandas as pd

    folder, meta = _meta(run_rftlab("run", "grue", "--preset", "smoke", "--device", "cuda", *extra,
                                    "--out", tmp_path, timeout=600))
    assert meta["device"].startswith("cuda") and meta["status"] == "complete"
    assert meta["precision"] == ("fp32" if extra else runtime.select_precision("auto", "cuda"))
    assert meta["compile"] == bool(extra)
    inputs = pd.read_parquet(folder / "inputs.parquet")
    assert inputs["reward_std"].between(0, 1).all() and inputs["reward_mean"].between(0, 1).all()


def test_margin_losses_smoke_runs_on_the_gpu_in_bf16_compiled(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    folder, meta = _meta(run_rftlab("run", "margin-losses", "--preset", "smoke", "--device", "cuda",
                                    "--precision", "bf16", "--compile", "--out", tmp_path, timeout=600))
    assert meta["precision"] == "bf16" and meta["compile"] is True
    for table in sorted(folder.glob("*.parquet")):
        # NaN marks a value not measured; the loss thresholds c_chosen / c_rejected are +inf by definition for
        # some losses; anything else infinite is an overflow
        numbers = pd.read_parquet(table).select_dtypes("number").drop(columns=["c_chosen", "c_rejected"],
                                                                      errors="ignore")
        values = numbers.to_numpy(dtype=float)
        assert np.isfinite(values[~np.isnan(values)]).all(), table.name
