"""margin-losses (Yuan et al. 2024, Fig. 1–2, Table 2): the smoke preset end to end through the CLI, its tables'
invariants (DPO at the reference has loss log 2, the normalised update is always predicted ideal, regime flags
are the threshold conditions, match rates come from the per-pair table), and the paper path (a loaded model
with LoRA, pairs from a local jsonl) on a tiny local stand-in."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_rftlab

from rftlab import registry, results
from rftlab.data import edit_pairs
from rftlab.experiments import margin_losses as ml


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("margin-losses")
    proc = run_rftlab("run", "margin-losses", "--preset", "smoke", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.is_dir(), proc.stdout
    return folder


@pytest.fixture(scope="module")
def metrics(smoke: Path) -> pd.DataFrame:
    return results.read_metrics(smoke)


@pytest.fixture(scope="module")
def probes(smoke: Path) -> pd.DataFrame:
    return results.read_table(smoke, "probes")


def smoke_config() -> ml.Config:
    return registry.preset_config(registry.get("margin-losses"), "smoke")


def test_metrics_cover_every_loss_optimizer_and_step(metrics: pd.DataFrame, smoke: Path) -> None:
    cfg = smoke_config()
    eval_steps = sorted({*range(0, cfg.steps, cfg.eval_every), cfg.steps})
    probe_steps = sorted({*range(0, cfg.steps, cfg.probe_every), cfg.steps})
    assert len(metrics) == len(cfg.optimizers) * len(cfg.losses) * len(eval_steps)
    for (opt, loss), group in metrics.groupby(["optimizer", "loss"]):
        assert opt in cfg.optimizers and loss in cfg.losses
        assert sorted(group.step) == eval_steps
        at_probe = group[group.step.isin(probe_steps)]
        for col in ("grad/norm_chosen", "grad/norm_rejected", "grad/inner", "grad/cosine", "regime/frac_chosen_down",
                    "regime/frac_rejected_up", "regime/match"):
            assert at_probe[col].notna().all(), col
        assert at_probe["grad/cosine"].between(-1, 1).all()
        assert ((at_probe["grad/norm_chosen"] > 0) & (at_probe["grad/norm_rejected"] > 0)).all()
        assert at_probe["regime/match"].between(0, 1).all()
    for col in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert metrics[col].notna().all() and np.isfinite(metrics[col]).all()
    assert (metrics["logps/chosen"] < 0).all() and (metrics["logps/rejected"] < 0).all()
    assert (smoke / "figures" / "margin_losses.png").stat().st_size > 20_000


def test_dpo_at_the_reference_has_loss_log_2(metrics: pd.DataFrame) -> None:
    start = metrics[metrics.step == 0]
    for loss in ("dpo", "rdpo"):  # equal response lengths: R-DPO's length term vanishes
        values = start[start.loss == loss].loss_value
        assert len(values) == 2 and np.allclose(values, math.log(2), atol=1e-5)
    assert np.allclose(start["rewards/margins"], 0, atol=1e-6)
    assert start[start.loss == ml.NORMALIZED].loss_value.isna().all()


def test_probe_table_is_self_consistent(probes: pd.DataFrame) -> None:
    np.testing.assert_allclose(probes.a, probes.norm_chosen**2, rtol=1e-9)
    np.testing.assert_allclose(probes.cosine, probes.rho / np.sqrt(probes.a * probes.b), rtol=1e-9)
    assert (probes.step_size > 0).all()
    # first-order prediction = step × (−∂L/∂x_w·a − ∂L/∂x_l·ρ)
    np.testing.assert_allclose(probes.pred_dw, probes.step_size * (-probes.d_w * probes.a - probes.d_l * probes.rho),
                               rtol=1e-4, atol=1e-9)
    # the threshold form: with p = −∂L/∂x_w > 0 and q = ∂L/∂x_l > 0, chosen falls iff ρ > c_chosen·a
    pushing = probes[(probes.d_w < 0) & (probes.d_l > 0)]
    assert len(pushing) > len(probes) / 2
    assert ((pushing.rho > pushing.c_chosen * pushing.a) == (pushing.pred_dw < 0)).all()
    assert ((pushing.rho > pushing.c_rejected * pushing.b) == (pushing.pred_dl > 0)).all()
    # every run starts from the same policy: at step 0 the gradient geometry is the same for every loss
    start = probes[probes.step == 0].groupby("pair")
    assert (start.cosine.std() < 1e-6).all() and (start.a.std() / start.a.mean() < 1e-6).all()


def test_pairwise_normalized_is_always_predicted_ideal(probes: pd.DataFrame, metrics: pd.DataFrame) -> None:
    pn = probes[probes.loss == ml.NORMALIZED]
    assert len(pn) > 0
    assert (pn.pred_regime == "ideal").all() and (pn.pred_dw > 0).all() and (pn.pred_dl < 0).all()
    np.testing.assert_allclose(pn.c_chosen * pn.c_rejected, 1.0, rtol=1e-5)
    assert (pn.obs_dw > 0).mean() >= 0.9 and (pn.obs_dl < 0).mean() >= 0.9
    rows = metrics[(metrics.loss == ml.NORMALIZED) & metrics["regime/frac_chosen_down"].notna()]
    assert (rows["regime/frac_chosen_down"] == 0).all() and (rows["regime/frac_rejected_up"] == 0).all()


def test_regime_table_is_computed_from_the_probes(smoke: Path, probes: pd.DataFrame) -> None:
    regimes = results.read_table(smoke, "regimes")
    assert len(regimes) == probes.groupby(["optimizer", "loss"]).ngroups
    assert regimes.match_rate.between(0, 1).all()
    for row in regimes.itertuples():
        group = probes[(probes.optimizer == row.optimizer) & (probes.loss == row.loss)]
        assert row.n == len(group) and row.match_rate == pytest.approx(group.match.mean())
        assert row.pred_ideal == pytest.approx((group.pred_regime == "ideal").mean())
    shares = regimes[[f"pred_{r}" for r in ml.REGIMES]].sum(axis=1)
    assert np.allclose(shares, 1) and np.allclose(regimes[[f"obs_{r}" for r in ml.REGIMES]].sum(axis=1), 1)
    by = regimes.set_index(["optimizer", "loss"])
    assert (by.xs("dpo", level="loss").rejected_up_where_dpo_down == 0).all()
    # an explicit NLL term on the chosen lowers the bar for the rejected to rise (thresholds q/p < 1)
    for opt in ("sgd", "adamw"):
        assert by.loc[(opt, "rpo"), "pred_rejected_up"] + by.loc[(opt, "rpo"), "pred_both"] > \
            by.loc[(opt, "dpo"), "pred_rejected_up"] + by.loc[(opt, "dpo"), "pred_both"]


def test_kappa_grows_with_the_shared_fraction(smoke: Path) -> None:
    edits = results.read_table(smoke, "edit_pairs")
    cfg = smoke_config()
    assert sorted(edits.k.unique()) == sorted(cfg.edit_ks)
    kappa = edits.groupby("shared_fraction").cosine.mean()
    assert kappa.iloc[-1] > kappa.iloc[0] + 0.3


def test_edit_pairs_substitute_exactly_k_tokens() -> None:
    responses = [list(range(10)), list(range(5, 17)), [1, 2]]
    pairs = edit_pairs.make_edit_pairs([[0]] * 3, responses, 8, (1, 3, 8), pool=range(20), seed=0)
    assert len(pairs) == 6  # the 2-token response is too short
    for pair in pairs:
        assert len(pair.chosen) == len(pair.rejected) == 8
        assert sum(w != r for w, r in zip(pair.chosen, pair.rejected, strict=True)) == pair.k
        assert pair.shared_fraction == pytest.approx(1 - pair.k / 8)
    with pytest.raises(ValueError, match="k"):
        edit_pairs.substitute([1, 2], 3, [4], random.Random(0))


def test_unknown_loss_is_a_one_line_error() -> None:
    with pytest.raises(Exception, match="Did you mean 'dpo'"):
        ml.Config(losses=("dpoo",))
    with pytest.raises(ValueError, match="optimizers"):
        ml.Config(optimizers=("adam",))
    proc = run_rftlab("run", "margin-losses", "--preset", "smoke", "--set", 'losses=["dpo", "simpoo"]', "--out",
                      "/nonexistent-out")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "unknown preference loss 'simpoo'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_paper_path_on_a_tiny_local_model_with_lora(tmp_path: Path) -> None:
    """The paper preset with model.name_or_path / data_path pointing at a tiny GPT-2 saved by save_pretrained and
    a jsonl of pairs; LoRA on c_attn, gradient statistics over the LoRA parameters only."""
    from rftlab import models, tokenization
    from rftlab.data import sentiment
    from rftlab.lm_config import LMConfig

    tokenizer = tokenization.word_tokenizer(sentiment.vocabulary_texts())
    model = models.build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=96), tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        for e in sentiment.make_examples(40, "long-suffix", 0):
            fh.write(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n")
    spec = registry.get("margin-losses")
    cfg = registry.preset_config(spec, "paper", [
        f"model.name_or_path={tmp_path / 'tiny'}", "model.lora_r=4", "model.lora_alpha=8", "lora_targets=[]",
        f"data_path={tmp_path / 'pairs.jsonl'}", "n_eval=8", "n_probe=4", "eval_every=1", "probe_every=2",
        "adamw_lr=1e-3", "losses=[\"dpo\", \"cpo\", \"pairwise-normalized\"]", "edit_length=8", "edit_ks=[1, 8]",
        "edit_pairs=4", "threads=1"])
    assert cfg.model.lora_r == 4 and cfg.grad_params == "lora" and cfg.micro_batch_size == 2 and cfg.steps == 0
    run = spec.new_run(cfg, preset="paper", out_root=tmp_path / "results")
    spec.run(cfg, run)
    run.finish("complete")
    metrics = results.read_metrics(run.path)
    assert sorted(metrics.step.unique()) == [0, 1, 2]  # one epoch of 28 pairs in batches of 16
    dpo = metrics[metrics.loss == "dpo"].sort_values("step")
    assert dpo.loss_value.iloc[0] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo["rewards/margins"].iloc[-1] != 0  # the adapters trained
    probes = results.read_table(run.path, "probes")
    assert set(probes.step) == {0, 2} and probes.groupby(["loss", "step"]).size().eq(4).all()
    assert probes.norm_chosen.gt(0).all() and probes.cosine.between(-1, 1).all()
    assert (probes[probes.loss == ml.NORMALIZED].pred_regime == "ideal").all()
    assert results.read_table(run.path, "edit_pairs").k.tolist().count(8) == 4
    figures = spec.plot([run.path], tmp_path / "figures")
    assert figures[0].stat().st_size > 20_000
