"""controlled (Razin et al. 2024, §4.2): the effect on the smoke preset, determinism and exact resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rftlab import registry, results
from rftlab.experiments import controlled


def smoke_config(*overrides: str):
    spec = registry.get("controlled")
    return spec, registry.preset_config(spec, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    spec, cfg = smoke_config()
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path_factory.mktemp("controlled"))
    controlled.run(cfg, run)
    run.finish("complete")
    return run.path


def test_rft_leaves_small_std_inputs_unfit_while_sft_fits_them(smoke: Path) -> None:
    metrics = results.read_metrics(smoke)
    first = metrics[metrics.epoch == 0].set_index("method")
    last = metrics[metrics.epoch == metrics.epoch.max()].set_index("method")
    # flipped inputs start with tiny std and reward ≈ −1
    assert first.loc["rft", "reward_std/small_std"] < 0.15
    assert first.loc["rft", "reward/small_std"] < -0.95
    # under RFT their gradient is far smaller than the rest's (≥ 100× at the default preset's scale)
    assert first.loc["rft", "grad_norm/rest"] > 20 * first.loc["rft", "grad_norm/small_std"]
    assert last.loc["rft", "accuracy/small_std"] < 0.1
    assert last.loc["sft", "accuracy/small_std"] > 0.95
    assert last.loc["rft", "accuracy/rest"] > 0.9 and last.loc["sft", "accuracy/rest"] > 0.9


def test_inputs_table_is_consistent_with_the_metrics(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    metrics = results.read_metrics(smoke)
    last = metrics[metrics.epoch == metrics.epoch.max()].set_index("method")
    for method, part in inputs.groupby("method"):
        small = part[part.flipped]
        assert len(small) == 30  # 10% of 300
        assert small.final_correct.mean() == pytest.approx(last.loc[method, "accuracy/small_std"])
        assert small.final_reward.mean() == pytest.approx(last.loc[method, "reward/small_std"], abs=1e-5)
        assert (small.label != small.original_label).all()


def test_same_seed_same_metrics_and_resume_replays_exactly(smoke: Path, tmp_path: Path) -> None:
    """A run that dies after its second checkpoint and is resumed gives the uninterrupted run's rows."""
    spec, cfg = smoke_config()

    class Dies(Exception):
        pass

    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path)
    saves = 0
    save = run.save_checkpoint

    def save_then_maybe_die(state):
        nonlocal saves
        save(state)
        saves += 1
        if saves == 5:  # inside the second method (sft), after rows were logged past the checkpoint
            run.log(method="sft", epoch=-1)  # a row the checkpoint does not cover
            raise Dies

    run.save_checkpoint = save_then_maybe_die
    with pytest.raises(Dies):
        controlled.run(cfg, run)
    run.finish("failed")
    partial = results.read_metrics(run.path)
    assert (partial.method == "sft").any()

    resumed = results.reopen_run(run.path, ["test", "--resume"])
    controlled.run(cfg, resumed)
    resumed.finish("complete")
    expected = results.read_metrics(smoke)
    got = results.read_metrics(run.path)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    pd.testing.assert_frame_equal(results.read_table(run.path, "inputs"), results.read_table(smoke, "inputs"))


def test_bad_model_for_data_is_a_user_error(tmp_path: Path) -> None:
    from rftlab.errors import RftlabError

    spec, cfg = smoke_config("model.kind=transformer")
    with pytest.raises(RftlabError, match="token data set"):
        controlled.run(cfg, spec.new_run(cfg, preset="smoke", out_root=tmp_path))


def test_paper_preset_without_data_names_what_to_provide(tmp_path: Path) -> None:
    from rftlab.errors import RftlabError

    spec = registry.get("controlled")
    for preset, expected in (("paper", "mnist.npz"), ("paper-cifar10", "cifar-10"), ("paper-stsb", "STS-B")):
        cfg = registry.preset_config(spec, preset, [f"data.data_dir={tmp_path}"])
        with pytest.raises(RftlabError, match=expected):
            controlled.run(cfg, spec.new_run(cfg, preset=preset, out_root=tmp_path / "out"))


@pytest.mark.slow
def test_default_preset_claims(tmp_path: Path) -> None:
    """The issue's numbers on the default preset (≈ 1 min): RFT < 10% vs SFT > 95% on the flipped inputs,
    both > 90% on the rest, and a ≥ 100× gradient-norm gap under RFT at the start."""
    spec = registry.get("controlled")
    cfg = registry.preset_config(spec, "default")
    run = spec.new_run(cfg, preset="default", out_root=tmp_path)
    controlled.run(cfg, run)
    run.finish("complete")
    metrics = results.read_metrics(run.path)
    first = metrics[metrics.epoch == 0].set_index("method")
    last = metrics[metrics.epoch == metrics.epoch.max()].set_index("method")
    assert first.loc["rft", "grad_norm/rest"] >= 100 * first.loc["rft", "grad_norm/small_std"]
    assert last.loc["rft", "accuracy/small_std"] < 0.1 and last.loc["sft", "accuracy/small_std"] > 0.95
    assert last.loc["rft", "accuracy/rest"] > 0.9 and last.loc["sft", "accuracy/rest"] > 0.9
