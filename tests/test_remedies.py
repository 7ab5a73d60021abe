"""remedies (Razin et al. 2024, §5.1 Table 2): the settings ladder, the smoke preset end to end, table values
recomputed from the per-input rows, exact resume, and one-line config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_killed_then_resumed

from rftlab import registry, results
from rftlab.errors import RftlabError
from rftlab.experiments import remedies
from rftlab.grue_stages import SMALL_STD


def smoke_config(*overrides: str):
    spec = registry.get("remedies")
    return spec, registry.preset_config(spec, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    spec, cfg = smoke_config()
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path_factory.mktemp("remedies"))
    remedies.run(cfg, run)
    run.finish("complete")
    return run.path


def test_the_ladder_moves_one_knob_at_a_time_from_plain_rft() -> None:
    spec = registry.get("remedies")
    cfg = registry.preset_config(spec, "default")
    settings = remedies.rft_settings(cfg)
    assert [s for s, *_ in settings] == ["rft", "lr_x3", "lr_x10", "temperature_1.5", "temperature_2",
                                         "ent_coef_0.01", "ent_coef_0.1"]  # ×1, τ = 1, 0 are plain RFT
    base = cfg.rft
    for setting, knob, value, rft in settings:
        changed = {f for f in ("lr", "temperature", "ent_coef") if getattr(rft, f) != getattr(base, f)}
        assert changed == (set() if knob == "none" else {knob}), setting
        if knob == "lr":
            assert rft.lr == pytest.approx(base.lr * value)
        elif knob != "none":
            assert getattr(rft, knob) == value
        assert rft.steps == base.steps  # every setting gets the same budget


def test_settings_table_is_computed_from_the_per_input_rows(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    table = results.read_table(smoke, "settings")
    _, cfg = smoke_config()
    assert {"task", "setting", "seed", "reward", "gap_closed", "frac_small_std_before",
            "frac_small_std_after"} <= set(table.columns)
    assert list(table.setting) == ["rft", "lr_x10", "temperature_2", "ent_coef_0.1", "sft_rft"]
    assert set(inputs.stage) == {*table.setting, "pretrained", "sft"}
    assert len(inputs) == (len(table) + 2) * cfg.tasks.n_stats
    pre = inputs[inputs.stage == "pretrained"]
    rewards = table.set_index("setting").reward
    for row in table.itertuples():
        after = inputs[(inputs.task == row.task) & (inputs.stage == row.setting)]
        assert row.reward == pytest.approx(after.reward_mean.mean())
        assert row.frac_small_std_before == pytest.approx((pre.reward_std < SMALL_STD).mean())
        assert row.frac_small_std_after == pytest.approx((after.reward_std < SMALL_STD).mean())
        gap = rewards["sft_rft"] - rewards["rft"]
        expected = (row.reward - rewards["rft"]) / gap if abs(gap) > 1e-9 else math.nan
        assert row.gap_closed == pytest.approx(expected, nan_ok=True)
        assert row.seed == cfg.seed
    assert table.set_index("setting").gap_closed[["rft", "sft_rft"]].tolist() in ([0.0, 1.0], [math.nan] * 2)


def test_every_setting_logs_its_own_ppo_run(smoke: Path) -> None:
    metrics = results.read_metrics(smoke)
    _, cfg = smoke_config()
    steps = metrics.groupby("stage").step.count()
    for stage in ("rft", "lr_x10", "temperature_2", "ent_coef_0.1", "sft_rft"):
        assert steps[stage] == cfg.rft.steps, stage
    assert steps["sft"] == cfg.sft.steps
    assert metrics[metrics.stage == "lr_x10"]["reward/mean"].notna().all()


def test_a_killed_sweep_resumes_to_the_same_tables(smoke: Path) -> None:
    spec, cfg = smoke_config()
    def parts_left(folder: Path) -> None:  # killed after totto/lr_x10: the finished units are on disk
        assert sorted(p.name for p in (folder / "parts").iterdir()) == [
            "totto-lr_x10.parquet", "totto-pretrained.parquet", "totto-rft.parquet"]

    # shares the smoke run's cached pretrained model
    path = run_killed_then_resumed(spec, cfg, smoke.parent.parent, kill_after=3, after_kill=parts_left)
    for name in ("settings", "inputs"):
        pd.testing.assert_frame_equal(results.read_table(path, name), results.read_table(smoke, name))
    pd.testing.assert_frame_equal(results.read_metrics(path), results.read_metrics(smoke))


def test_plot_renders_the_table_and_the_small_std_shares(smoke: Path) -> None:
    paths = remedies.plot([smoke], smoke / "figures")
    assert [p.name for p in paths] == ["remedies_table2.png", "remedies_small_std.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize(("override", "message"), [
    ("sweep=[imdb]", "sweep \\['imdb'\\] must name tasks of tasks.names"),
    ("temperatures=[1,0]", "temperatures must be > 0"),
    ("ent_coefs=[-0.1]", "ent_coefs must be ≥ 0"),
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
