"""sft-fraction (Razin et al. 2024, §5.2 Fig. 4): the grid and the labelled subsets, the smoke preset end to end,
the grid table recomputed from the per-input rows, exact resume, and one-line config errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import run_killed_then_resumed

from rftlab import registry, results
from rftlab.errors import RftlabError
from rftlab.experiments import sft_fraction
from rftlab.grue_stages import SMALL_STD


def smoke_config(*overrides: str):
    spec = registry.get("sft-fraction")
    return spec, registry.preset_config(spec, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    spec, cfg = smoke_config()
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path_factory.mktemp("sft-fraction"))
    sft_fraction.run(cfg, run)
    run.finish("complete")
    return run.path


def test_grid_and_nested_labelled_subsets() -> None:
    spec = registry.get("sft-fraction")
    cfg = registry.preset_config(spec, "default")
    units = sft_fraction.grid(cfg)
    assert units[0] == (0.0, 0.0) and len(units) == 1 + 3 * 3
    assert (0.01, 0.4) in units and (1.0, 1.0) in units  # the paper's headline cell and the reference
    assert [sft_fraction.sft_steps(cfg, s) for s in (0.1, 0.4, 1.0)] == [15, 60, 150]
    examples = list(range(400))
    subsets = {f: sft_fraction.labelled_subset(examples, f, seed=0) for f in (0.01, 0.1, 1.0)}
    assert [len(s) for s in subsets.values()] == [4, 40, 400]
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0]) == set(examples)
    assert subsets[0.1] != examples[:40]  # random, not the first inputs
    assert len(sft_fraction.labelled_subset(examples, 0.001, seed=0)) == 1  # never empty


def test_grid_table_is_computed_from_the_per_input_rows(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    table = results.read_table(smoke, "grid")
    _, cfg = smoke_config()
    assert {"task", "fraction", "steps_fraction", "seed", "reward", "relative_to_full"} <= set(table.columns)
    assert list(zip(table.fraction, table.steps_fraction, strict=True)) == sft_fraction.grid(cfg)
    full = table[(table.fraction == 1) & (table.steps_fraction == 1)]
    assert full.relative_to_full.tolist() == [1.0]
    for row in table.itertuples():
        stage = "sft_rft" if row.fraction else "rft"
        after = inputs[(inputs.stage == stage) & (inputs.fraction == row.fraction)
                       & (inputs.steps_fraction == row.steps_fraction)]
        assert len(after) == cfg.tasks.n_stats
        assert row.reward == pytest.approx(after.reward_mean.mean())
        assert row.relative_to_full == pytest.approx(row.reward / full.reward.iloc[0])
        assert row.frac_small_std_final == pytest.approx((after.reward_std < SMALL_STD).mean())
        assert row.n_labelled == (round(row.fraction * cfg.tasks.n_train) if row.fraction else 0)
        assert row.sft_steps == (round(row.steps_fraction * cfg.sft.steps) if row.fraction else 0)
        assert row.seed == cfg.seed


def test_each_setting_runs_its_own_sft_then_the_same_rft(smoke: Path) -> None:
    metrics = results.read_metrics(smoke)
    _, cfg = smoke_config()
    sft = metrics[metrics.stage == "sft"].groupby(["fraction", "steps_fraction"]).step.count()
    assert sft.to_dict() == {(f, s): round(s * cfg.sft.steps) for f, s in sft_fraction.grid(cfg) if f}
    rft = metrics[metrics.stage.isin(["rft", "sft_rft"])].groupby(["fraction", "steps_fraction"]).step.count()
    assert set(rft) == {cfg.rft.steps} and len(rft) == len(sft_fraction.grid(cfg))
    checkpoints = sorted(p.name for p in (smoke / "checkpoints").glob("totto-sft-*.pt"))
    assert checkpoints == ["totto-sft-0.1-0.5.pt", "totto-sft-0.1-1.pt", "totto-sft-1-0.5.pt", "totto-sft-1-1.pt"]


def test_a_killed_sweep_resumes_to_the_same_tables(smoke: Path) -> None:
    spec, cfg = smoke_config()
    # killed after the SFT of the first grid cell, before its RFT; shares the smoke run's cached pretrained model
    path = run_killed_then_resumed(spec, cfg, smoke.parent.parent, kill_after=3)
    for name in ("grid", "inputs"):
        pd.testing.assert_frame_equal(results.read_table(path, name), results.read_table(smoke, name))
    pd.testing.assert_frame_equal(results.read_metrics(path), results.read_metrics(smoke))


def test_plot_renders_the_heatmap_and_the_std_distributions(smoke: Path) -> None:
    paths = sft_fraction.plot([smoke], smoke / "figures")
    assert [p.name for p in paths] == ["sft_fraction_fig4.png", "sft_fraction_std.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize(("override", "message"), [
    ("fractions=[0.01,0.1]", "fractions must lie in \\(0, 1\\] and contain 1"),
    ("steps_fractions=[0,1]", "steps_fractions must lie in \\(0, 1\\]"),
    ("sweep=[cnn_dm]", "sweep \\['cnn_dm'\\] must name tasks of tasks.names"),
])
def test_bad_settings_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(RftlabError, match=message) as info:
        smoke_config(override)
    assert "\n" not in str(info.value)


def test_missing_real_data_or_model_folder_fails_before_a_run_folder(tmp_path: Path) -> None:
    spec, cfg = smoke_config("tasks.source=real", f"tasks.data_dir={tmp_path}")
    with pytest.raises(RftlabError, match="load_dataset") as info:
        spec.check(cfg)
    assert "\n" not in str(info.value)
    spec, cfg = smoke_config(f"model.name_or_path={tmp_path / 'no-model'}")
    with pytest.raises(RftlabError, match="is not a folder"):
        spec.check(cfg)
    spec.check(smoke_config()[1])  # the synthetic preset needs nothing local
