"""entanglement-toy (Yuan et al. 2024, §3–4): on the smoke preset, single-token pairs with learnable logits stay in
the ideal regime under DPO, shared-token pairs on an anisotropic last layer are entangled (cosine > 0.9, chosen
falls) exactly where (ρ, a, b) predict, and the pairwise-normalised update never moves either log-prob the wrong
way to first order. Per-pair gradients are checked against a plain autograd loop."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_rftlab

from rftlab import results
from rftlab.experiments import entanglement_toy as toy


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("entanglement-toy")
    proc = run_rftlab("run", "entanglement-toy", "--preset", "smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.is_dir(), proc.stdout
    return folder


@pytest.fixture(scope="module")
def steps(smoke: Path) -> pd.DataFrame:
    return results.read_table(smoke, "steps")


@pytest.fixture(scope="module")
def metrics(smoke: Path) -> pd.DataFrame:
    return results.read_metrics(smoke)


def cell(frame: pd.DataFrame, setting: str, params: str, loss: str) -> pd.DataFrame:
    sub = frame[(frame.setting == setting) & (frame.params == params) & (frame.loss == loss)]
    assert len(sub) > 0
    return sub


def test_tables_shape_and_figure(steps: pd.DataFrame, metrics: pd.DataFrame, smoke: Path) -> None:
    cfg = toy.Config(n_pairs=16, steps=150)  # the smoke preset
    combos = len(cfg.settings) * len(cfg.param_kinds) * len(cfg.losses)
    assert len(steps) == combos * cfg.steps * cfg.n_pairs
    assert len(metrics) == combos * cfg.steps
    for col in ("logps/chosen", "logps/rejected", "rewards/margins", "grad/cosine", "regime/frac_chosen_down",
                "regime/frac_rejected_up", "sign_match"):
        assert col in metrics.columns and metrics[col].notna().all()
    assert (smoke / "figures" / "entanglement_toy.png").stat().st_size > 10_000


def test_single_token_logits_dpo_is_always_ideal(steps: pd.DataFrame) -> None:
    one = cell(steps, "single-token", "logits", "dpo")
    assert (one.rho < one[["a", "b"]].min(axis=1)).all()
    assert not one.chosen_down.any() and not one.rejected_up.any()
    assert (one.obs_dw > 0).all() and (one.obs_dl < 0).all()
    assert (one.pred_dw > 0).all() and (one.pred_dl < 0).all()


def test_shared_last_layer_dpo_is_entangled_as_predicted(steps: pd.DataFrame, metrics: pd.DataFrame) -> None:
    rows = cell(steps, "shared", "last-layer", "dpo")
    per_step = cell(metrics, "shared", "last-layer", "dpo").sort_values("step")
    assert rows.cosine.mean() > 0.9 and per_step["grad/cosine"].iloc[-1] > 0.9
    # the predicted regime happens, and its signs are the observed ones
    assert rows.chosen_down.mean() > 0.2
    assert ((rows.obs_dw < 0) == rows.chosen_down).mean() >= 0.95
    assert ((rows.obs_dl > 0) == rows.rejected_up).mean() >= 0.95
    assert (per_step.sign_match == 1).mean() >= 0.95 and per_step.sign_match.mean() >= 0.95
    # the margin still grows while the chosen log-prob ends below where it started
    assert per_step["rewards/margins"].iloc[-1] > 0
    assert per_step["logps/chosen"].iloc[-1] < per_step["logps/chosen"].iloc[0]


def test_shared_logits_dpo_stays_ideal_and_dpo_nll_raises_rejected(steps: pd.DataFrame) -> None:
    logits = cell(steps, "shared", "logits", "dpo")
    assert logits.cosine.mean() > 0.9 and not logits.chosen_down.any() and not logits.rejected_up.any()
    cpo = cell(steps, "shared", "last-layer", "cpo")
    assert cpo.rejected_up.mean() > 0.5
    first, last = cpo[cpo.step == 0], cpo[cpo.step == cpo.step.max()]
    assert last.x_l.mean() > first.x_l.mean()


def test_regime_flags_are_the_signs_of_the_prediction(steps: pd.DataFrame) -> None:
    losses = steps[steps.loss != toy.NORMALIZED]
    assert ((losses.pred_dw < 0) == losses.chosen_down).all()
    assert ((losses.pred_dl > 0) == losses.rejected_up).all()


def test_pairwise_normalized_never_moves_the_wrong_way(steps: pd.DataFrame) -> None:
    pn = steps[steps.loss == toy.NORMALIZED]
    assert len(pn) > 0
    assert (pn.pred_dw >= 0).all() and (pn.pred_dl <= 0).all()
    assert not pn.chosen_down.any() and not pn.rejected_up.any()
    assert ((pn.obs_dw >= 0) & (pn.obs_dl <= 0)).mean() >= 0.95


@pytest.mark.parametrize("kind", ["logits", "last-layer"])
def test_batched_per_pair_gradients_match_a_loop(kind: str) -> None:
    cfg = toy.Config(n_pairs=3, seq_len=4, vocab_size=7, hidden_dim=5)
    gen = torch.Generator().manual_seed(0)
    y_w, y_l = toy._pairs(cfg, "shared", gen)
    assert (y_w[:, :3] == y_l[:, :3]).all() and (y_w[:, 3] != y_l[:, 3]).all()
    hidden = toy._hidden_states(cfg, 4, gen)
    shape = (3, 4, 7) if kind == "logits" else (3, 7, 5)
    theta = torch.randn(*shape, generator=gen).requires_grad_(True)
    (batched,) = torch.autograd.grad(toy._logps(kind, theta, hidden, y_w).sum(), theta)
    for i in range(3):
        one = theta[i].detach().clone().requires_grad_(True)
        z = one if kind == "logits" else hidden[i] @ one.T  # (n, V)
        logp = sum(torch.log_softmax(z[t], -1)[y_w[i, t]] for t in range(4))
        (oracle,) = torch.autograd.grad(logp, one)
        torch.testing.assert_close(batched[i], oracle)


def test_high_condition_number_aligns_hidden_states() -> None:
    def mean_cos(cond: float) -> float:
        h = toy._hidden_states(toy.Config(condition_number=cond, n_pairs=8), 12, torch.Generator().manual_seed(0))
        h = torch.nn.functional.normalize(h, dim=-1)
        return (h @ h.transpose(1, 2)).mean().item()

    assert mean_cos(1000.0) > 0.8 > 0.2 > mean_cos(1.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_diff"):
        toy.Config(n_diff=12)
    with pytest.raises(ValueError, match="settings"):
        toy.Config(settings=("shared", "sharde"))
    with pytest.raises(Exception, match="Did you mean 'dpo'"):
        toy.Config(losses=("dpoo",))
