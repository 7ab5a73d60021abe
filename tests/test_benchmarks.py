"""The benchmark harness: a --quick run writes the table and a parquet of the documented schema, and every
benchmark's rftlab side computes what its reference side computes on the same inputs (DPO loss, group-RFT loss,
per-input rewards, per-pair gradient statistics)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import common, dpo_step, group_rft_step, runner, sampling  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_quick_run_writes_table_parquet_and_provenance(tmp_path: Path) -> None:
    printed: list[str] = []
    folder = runner.run(quick=True, out=tmp_path, log=lambda _: None, echo=printed.append)
    assert folder.parent == tmp_path / "bench" and folder.name.endswith("-quick")
    frame = pd.read_parquet(folder / "benchmarks.parquet")
    assert list(frame.columns) == ["benchmark", "model", "impl", "throughput", "unit", "median_s", "min_s", "max_s"]
    assert set(frame.benchmark) == set(runner.BENCHMARKS)
    impls = frame.groupby("benchmark").impl.apply(set).to_dict()
    trl = {"trl", "trl-precompute"} if common.trl_available() else set()
    assert impls["dpo-step"] == {"rftlab", "rftlab-1epoch", "minimal"} | trl
    assert impls["group-rft-step"] == {"rftlab", "minimal"} | ({"trl-beta0", "trl-beta0.04"} if trl else set())
    assert impls["pair-grad-stats"] == {"fast", "exact-loop", "floor"}
    assert impls["reward-std"] == {"rftlab", "per-input-loop"}
    assert {"rftlab", "minimal", "matmul-peak"} <= impls["flops"]
    assert set(frame[frame.benchmark != "flops"].model) == {"1x32-fp32"}
    assert (frame.throughput > 0).all() and (frame.min_s <= frame.median_s).all()
    assert (frame.median_s <= frame.max_s).all()
    units = dict(zip(frame.benchmark, frame.unit, strict=False))
    assert units["dpo-step"] == "pairs/s" and units["group-rft-step"] == "completions/s"
    text = "\n".join(printed)
    assert "| dpo-step | 1x32-fp32 | rftlab |" in text and "Conditions:" in text
    assert ("TRL is not installed" in text) == (not common.trl_available())
    assert (folder / "table.md").read_text().strip() == text.strip()
    config = json.loads((folder / "config.json").read_text())
    assert config["quick"] and config["threads"] >= 1 and "other_processes_cpu_share" in config["load"]


def test_dpo_step_rftlab_loss_equals_the_minimal_loop() -> None:
    losses = dpo_step.step0_losses()
    assert losses["rftlab"] == pytest.approx(losses["minimal"], rel=1e-5)
    assert not math.isclose(losses["rftlab"], math.log(2), rel_tol=1e-3)  # the reference differs from the policy


def test_group_rft_step_rftlab_loss_equals_the_minimal_loop() -> None:
    for seed in (0, 1):
        losses = group_rft_step.step0_losses(seed=seed)
        assert losses["rftlab"] == pytest.approx(losses["minimal"], rel=1e-4, abs=1e-7)
        assert losses["rftlab"] != 0


def test_reward_std_rewards_equal_the_per_input_loop_under_one_seed() -> None:
    model = common.build_model("1x32")
    prompts = sampling.make_prompts(common.tokenizer(), sampling.corpus(), 3, 8)
    for i, prompt in enumerate(prompts):
        ours, mean, std = sampling.rftlab_stats(model, [prompt], k=4, new_tokens=6, batch_size=8, seed=i)
        torch.manual_seed(i)
        theirs, _, _ = sampling.loop_stats(model, [prompt], k=4, new_tokens=6)
        np.testing.assert_allclose(ours, theirs)
        np.testing.assert_allclose(mean, ours.mean(1)) and np.testing.assert_allclose(std, ours.std(1, ddof=1))


def test_pair_grad_stats_fast_matches_the_exact_loop() -> None:
    from benchmarks import pair_grad_stats
    from rftlab.diagnostics import pair_gradient_stats

    model = common.build_model("1x32")
    pairs = pair_grad_stats.make_pairs(3, 5, 4, common.VOCAB)
    fast = pair_gradient_stats(model, *pairs, method="fast")
    exact = pair_gradient_stats(model, *pairs, method="exact")
    for column in ("norm_chosen", "norm_rejected", "inner"):
        np.testing.assert_allclose(fast[column], exact[column], rtol=1e-4)


def test_targets_and_ratios_read_the_medians() -> None:
    rows = [common.row("dpo-step", "4x256-fp32", impl, 16, "pairs/s", [s]) for impl, s in
            (("rftlab", 0.1), ("trl", 0.2), ("minimal", 0.12))]
    rows.append({"benchmark": "flops", "model": "matmul-fp32", "impl": "matmul-peak", "throughput": 200.0,
                 "unit": "GFLOP/s", "median_s": 0.01, "min_s": 0.01, "max_s": 0.01})
    rows.append(common.row("flops", "4x256-fp32", "rftlab", 130.0, "GFLOP/s", [1.0]))
    frame = pd.DataFrame(rows, columns=common.COLUMNS)
    text = runner.format_table(frame)
    assert "| dpo-step | 4x256-fp32 | trl | 80.0 | pairs/s | 0.200 | 0.200–0.200 | 2.00 |  |" in text
    assert "| flops | 4x256-fp32 | rftlab | 130.0 | GFLOP/s | 1.000 | 1.000–1.000 | 1.00 | 65% |" in text
    assert "PASS: dpo-step 4x256-fp32: rftlab 160.0 pairs/s = 2.00× TRL fp32 80.0" in text
    assert "PASS: flops 4x256-fp32" in text


def test_unknown_benchmark_is_a_one_line_error(rftlab) -> None:
    result = rftlab("bench", "no-such-benchmark")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown benchmark 'no-such-benchmark'")
