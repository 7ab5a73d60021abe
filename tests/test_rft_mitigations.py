"""rft-mitigations: the smoke preset end to end, equal budgets, the filter and the low-std selection, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_killed_then_resumed

from rftlab import registry, results
from rftlab.errors import RftlabError
from rftlab.experiments import rft_mitigations as rm


def smoke_config(*overrides: str):
    spec = registry.get("rft-mitigations")
    return spec, registry.preset_config(spec, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    spec, cfg = smoke_config()
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path_factory.mktemp("rft-mitigations"))
    rm.run(cfg, run)
    run.finish("complete")
    return run.path


def test_every_method_gets_the_same_sample_and_label_budget(smoke: Path) -> None:
    _, cfg = smoke_config()
    rows = results.read_table(smoke, "methods")
    assert len(rows) == len(cfg.seeds) * len(cfg.finetune_tasks) * len(rm.METHODS)
    assert set(rows.method) == set(rm.METHODS) and set(rows.seed) == set(cfg.seeds)
    budget = cfg.rft.steps * cfg.rft.batch_prompts * cfg.rft.k
    assert (rows.samples_used == budget).all()
    sft = rows.method.str.startswith("sft_")
    assert (rows.labels_used[sft] == round(cfg.label_fraction * cfg.tasks.n_train)).all()
    assert (rows.labels_used[~sft] == 0).all()
    metrics = results.read_metrics(smoke)
    rft = metrics[metrics.stage.isin(list(rm.METHODS))]
    used = rft.groupby(["seed", "task", "stage"]).samples.sum()
    assert (used == budget).all()  # the filter's resampling is counted in the budget


def test_the_filter_resamples_and_the_plain_methods_do_not(smoke: Path) -> None:
    _, cfg = smoke_config()
    metrics = results.read_metrics(smoke)
    rows = results.read_table(smoke, "methods").set_index(["seed", "method"])
    for method, (_, _, filtered) in rm.METHODS.items():
        part = metrics[metrics.stage == method]
        assert (part["filter/kept_prompts"] <= cfg.rft.batch_prompts).all()
        if filtered:  # zero-std groups are common on the smoke task: rounds > 1, so fewer optimizer steps
            assert (part["filter/rounds"] > 1).any()
            assert (part["filter/rounds"] <= 1 + cfg.rft.max_resample_rounds).all()
            assert (rows.xs(method, level="method").rft_steps < cfg.rft.steps).all()
        else:
            assert (part["filter/rounds"] == 1).all() and (part["filter/kept_prompts"] == cfg.rft.batch_prompts).all()
            assert (rows.xs(method, level="method").rft_steps == cfg.rft.steps).all()
        mean_share = part.groupby("seed").frac_reward_zero_std.mean()
        np.testing.assert_allclose(rows.xs(method, level="method").frac_zero_std_mean.loc[mean_share.index],
                                   mean_share)


def test_rewards_in_the_methods_table_are_those_of_the_inputs_table(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    rows = results.read_table(smoke, "methods")
    for row in rows.itertuples():
        initial = inputs[(inputs.seed == row.seed) & (inputs.task == row.task) & (inputs.stage == "initial")]
        final = inputs[(inputs.seed == row.seed) & (inputs.task == row.task) & (inputs.stage == row.method)]
        small = initial.reward_std.to_numpy() < rm.SMALL_STD
        assert row.reward == pytest.approx(final.reward_mean.mean())
        assert row.reward_initial == pytest.approx(initial.reward_mean.mean())
        assert row.n_small_std == small.sum()
        if small.any():
            assert row.reward_small_std == pytest.approx(final.reward_mean.to_numpy()[small].mean())


def test_low_std_selection_labels_the_lowest_std_inputs(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    labelled = results.read_table(smoke, "labelled")
    for (seed, task), chosen in labelled[labelled.selection == "low_std"].groupby(["seed", "task"]):
        initial = inputs[(inputs.seed == seed) & (inputs.task == task) & (inputs.stage == "initial")]
        rest = initial[~initial.input_id.isin(chosen.input_id)]
        worst = chosen.sort_values(["reward_std", "reward_mean"]).iloc[-1]
        # nothing left out has a lower std, or the same std and a lower mean
        assert not ((rest.reward_std < worst.reward_std)
                    | ((rest.reward_std == worst.reward_std) & (rest.reward_mean < worst.reward_mean))).any()
    random = labelled[labelled.selection == "random"]
    assert random.groupby("seed").input_id.apply(tuple).nunique() == random.seed.nunique()  # a draw per seed


def test_select_labelled_breaks_std_ties_by_the_lowest_mean() -> None:
    initial = pd.DataFrame({"input_id": range(6), "reward_std": [0.0, 0.3, 0.0, 0.01, 0.0, 0.2],
                            "reward_mean": [0.5, 0.0, 0.1, 0.0, 0.3, 0.9]})
    assert rm.select_labelled(initial, 3, "low_std", seed=0) == [2, 4, 0]
    assert rm.select_labelled(initial, 4, "low_std", seed=0) == [2, 4, 0, 3]
    drawn = rm.select_labelled(initial, 3, "random", seed=1)
    assert len(set(drawn)) == 3 and drawn == rm.select_labelled(initial, 3, "random", seed=1)


def test_a_run_killed_between_methods_resumes_to_the_same_rows(smoke: Path) -> None:
    spec, cfg = smoke_config()
    # killed after seed 0 (initial, grpo, dr_grpo, grpo_filter); shares the smoke run's cached pretrained model
    path = run_killed_then_resumed(spec, cfg, smoke.parent.parent, kill_after=4)
    for table in ("methods", "inputs", "labelled"):
        pd.testing.assert_frame_equal(results.read_table(path, table), results.read_table(smoke, table))
    pd.testing.assert_frame_equal(results.read_metrics(path), results.read_metrics(smoke))


def test_plot_writes_the_figure(smoke: Path, tmp_path: Path) -> None:
    paths = rm.plot([smoke], tmp_path)
    assert [p.name for p in paths] == ["rft_mitigations.png"] and paths[0].stat().st_size > 10_000


def test_unknown_method_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RftlabError, match="unknown method"):
        smoke_config("methods=[grpo,dapo]")
