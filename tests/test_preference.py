"""Margin-based preference losses: published formulas written out independently, aliases, errors,
gradient-entanglement thresholds and a finite-difference check of the first-order log-prob changes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rftlab import preference as pref
from rftlab.errors import RftlabError

F64 = torch.float64
B = 16


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_w = torch.randint(1, 30, (B,), generator=g).to(F64)
    n_l = torch.randint(1, 30, (B,), generator=g).to(F64)
    w = -n_w * (0.2 + 2.0 * torch.rand(B, generator=g, dtype=F64))
    l = -n_l * (0.2 + 2.0 * torch.rand(B, generator=g, dtype=F64))
    rw = w + torch.randn(B, generator=g, dtype=F64)
    rl = l + torch.randn(B, generator=g, dtype=F64)
    return {"w": w, "l": l, "rw": rw, "rl": rl, "nw": n_w, "nl": n_l}


def call(name: str, t: dict[str, torch.Tensor], **hp: float) -> torch.Tensor:
    return pref.preference_loss(name, t["w"], t["l"], t["rw"], t["rl"], t["nw"], t["nl"], **hp)


# ------------------------------------------------------------------------------------------ DPO anchors
def test_dpo_at_reference_is_log2_and_gradient_is_minus_half_beta() -> None:
    w = torch.tensor([-3.0, -10.0, -0.5], dtype=F64)
    l = torch.tensor([-4.0, -2.0, -7.0], dtype=F64)
    beta = 0.25
    loss = pref.preference_loss("dpo", w, l, w.clone(), l.clone(), beta=beta)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0), dtype=F64), rtol=0, atol=1e-15)
    d_w, d_l = pref.loss_partials("dpo", w, l, w.clone(), l.clone(), beta=beta)
    torch.testing.assert_close(d_w, torch.full((3,), -beta / 2, dtype=F64))
    torch.testing.assert_close(d_l, torch.full((3,), beta / 2, dtype=F64))


def test_dpo_threshold_coefficients_are_one_one(batch: dict[str, torch.Tensor]) -> None:
    c_w, c_l = pref.threshold_coefficients("dpo", batch["w"], batch["l"], batch["rw"], batch["rl"])
    torch.testing.assert_close(c_w, torch.ones(B, dtype=F64))
    torch.testing.assert_close(c_l, torch.ones(B, dtype=F64))


# ------------------------------------------------------------------------------- published formulas
def test_dpo_and_sigmoid_match_trl(batch: dict[str, torch.Tensor]) -> None:
    t, beta = batch, 0.3
    expected = -F.logsigmoid(beta * ((t["w"] - t["rw"]) - (t["l"] - t["rl"])))
    torch.testing.assert_close(call("dpo", t, beta=beta), expected)
    torch.testing.assert_close(call("sigmoid", t, beta=beta), expected)


def test_ipo_matches_trl_per_token_average(batch: dict[str, torch.Tensor]) -> None:
    t, beta = batch, 0.2
    h = (t["w"] / t["nw"] - t["rw"] / t["nw"]) - (t["l"] / t["nl"] - t["rl"] / t["nl"])
    torch.testing.assert_close(call("ipo", t, beta=beta), (h - 1 / (2 * beta)) ** 2)


def test_slic_hinge_with_and_without_reference(batch: dict[str, torch.Tensor]) -> None:
    t, beta = batch, 0.1
    h = (t["w"] - t["rw"]) - (t["l"] - t["rl"])
    torch.testing.assert_close(call("hinge", t, beta=beta), torch.relu(1 - beta * h))
    torch.testing.assert_close(call("slic", t, beta=beta), torch.relu(1 - beta * h))
    no_ref = pref.preference_loss("slic", t["w"], t["l"], beta=beta, sft_weight=0.5)
    torch.testing.assert_close(no_ref, torch.relu(1 - beta * (t["w"] - t["l"])) - 0.5 * t["w"])


def test_rdpo_penalises_a_longer_chosen(batch: dict[str, torch.Tensor]) -> None:
    t, beta, alpha = batch, 0.1, 0.05
    h = (t["w"] - t["rw"]) - (t["l"] - t["rl"])
    expected = -F.logsigmoid(beta * h - alpha * (t["nw"] - t["nl"]))
    torch.testing.assert_close(call("rdpo", t, beta=beta, alpha=alpha), expected)


def test_simpo_matches_paper(batch: dict[str, torch.Tensor]) -> None:
    t, beta, gamma = batch, 2.0, 1.0
    expected = -F.logsigmoid(beta / t["nw"] * t["w"] - beta / t["nl"] * t["l"] - gamma)
    torch.testing.assert_close(call("simpo", t, beta=beta, gamma=gamma), expected)
    # reference-free: the refs are ignored
    no_ref = pref.preference_loss("simpo", t["w"], t["l"], None, None, t["nw"], t["nl"], beta=beta, gamma=gamma)
    torch.testing.assert_close(no_ref, expected)


def test_dpop_matches_smaug(batch: dict[str, torch.Tensor]) -> None:
    t, beta, lam = batch, 0.1, 50.0
    h = (t["w"] - t["rw"]) - (t["l"] - t["rl"])
    expected = -F.logsigmoid(beta * (h - lam * torch.relu(t["rw"] - t["w"])))
    torch.testing.assert_close(call("dpop", t), expected)
    assert (t["rw"] > t["w"]).any() and (t["rw"] < t["w"]).any()  # both branches exercised


def test_cpo_matches_trl_cpo_and_rpo_adds_nll_to_dpo(batch: dict[str, torch.Tensor]) -> None:
    t, beta, alpha = batch, 0.1, 1.0
    nll = -t["w"] / t["nw"]
    torch.testing.assert_close(call("cpo", t), -F.logsigmoid(beta * (t["w"] - t["l"])) + alpha * nll)
    dpo = -F.logsigmoid(beta * ((t["w"] - t["rw"]) - (t["l"] - t["rl"])))
    torch.testing.assert_close(call("rpo", t, alpha=0.5), dpo + 0.5 * nll)


def test_orpo_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    t, lam = batch, 0.1
    aw, al = t["w"] / t["nw"], t["l"] / t["nl"]
    log_odds = (aw - al) - (torch.log1p(-torch.exp(aw)) - torch.log1p(-torch.exp(al)))
    expected = -aw - lam * F.logsigmoid(log_odds)
    torch.testing.assert_close(call("orpo", t), expected)


def test_rrhf_matches_ranking_plus_nll(batch: dict[str, torch.Tensor]) -> None:
    t = batch
    aw, al = t["w"] / t["nw"], t["l"] / t["nl"]
    torch.testing.assert_close(call("rrhf", t, alpha=2.0), torch.relu(al - aw) - 2.0 * aw)


# ----------------------------------------------------------------------------------------- the table
def test_table_entries_are_complete_and_frozen() -> None:
    expected = {"dpo", "ipo", "slic", "rdpo", "simpo", "dpop", "cpo", "rpo", "rrhf", "orpo"}
    assert set(pref.METHODS) == expected
    assert pref.ALIASES == {"sigmoid": "dpo", "hinge": "slic"}
    for name, m in pref.METHODS.items():
        assert m.name == name and m.citation and m.formula and callable(m.fn)
    with pytest.raises(AttributeError):
        pref.METHODS["dpo"].name = "x"  # type: ignore[misc]


def test_unknown_name_and_missing_inputs_raise_clear_errors(batch: dict[str, torch.Tensor]) -> None:
    t = batch
    with pytest.raises(RftlabError, match="Did you mean 'simpo'"):
        pref.preference_loss("simop", t["w"], t["l"])
    with pytest.raises(RftlabError, match="needs reference log-probs"):
        pref.preference_loss("dpo", t["w"], t["l"])
    with pytest.raises(RftlabError, match="needs response lengths"):
        pref.preference_loss("simpo", t["w"], t["l"])
    with pytest.raises(RftlabError, match="Did you mean 'beta'"):
        call("dpo", t, betta=0.1)


# ------------------------------------------------------------------------------------ thresholds
def test_thresholds_match_general_form(batch: dict[str, torch.Tensor]) -> None:
    t = batch
    # SimPO (and IPO below its target): length ratio
    c_w, c_l = pref.threshold_coefficients("simpo", t["w"], t["l"], None, None, t["nw"], t["nl"])
    torch.testing.assert_close(c_w, t["nl"] / t["nw"])
    torch.testing.assert_close(c_l, t["nw"] / t["nl"])
    # R-DPO: as DPO
    c_w, c_l = pref.threshold_coefficients("rdpo", t["w"], t["l"], t["rw"], t["rl"], t["nw"], t["nl"])
    torch.testing.assert_close(c_w, torch.ones(B, dtype=F64))
    # DPOP: (1+λ) below the reference, 1 above
    c_w, c_l = pref.threshold_coefficients("dpop", t["w"], t["l"], t["rw"], t["rl"], lam=50.0)
    below = t["rw"] > t["w"]
    torch.testing.assert_close(c_w, torch.where(below, 51.0, 1.0).to(F64))
    torch.testing.assert_close(c_l, torch.where(below, 1 / 51.0, 1.0).to(F64))
    # CPO: 1 + Λ'/m' with Λ' = α/|y_w|, m' = β σ(−β(x_w − x_l))
    beta, alpha = 0.1, 1.0
    m_prime = beta * torch.sigmoid(-beta * (t["w"] - t["l"]))
    c_w, c_l = pref.threshold_coefficients("cpo", t["w"], t["l"], None, None, t["nw"], t["nl"])
    torch.testing.assert_close(c_w, 1 + alpha / t["nw"] / m_prime)
    torch.testing.assert_close(c_l, 1 / (1 + alpha / t["nw"] / m_prime))


def test_ranked_rrhf_pair_has_inf_and_zero_thresholds() -> None:
    w, l = torch.tensor([-2.0], dtype=F64), torch.tensor([-20.0], dtype=F64)
    c_w, c_l = pref.threshold_coefficients("rrhf", w, l, None, None, 2.0, 4.0)
    assert math.isinf(c_w.item()) and c_l.item() == 0.0


# --------------------------------------------------------------------- finite-difference dynamics
class TinyLM:
    """Log-linear next-token model: logits_t = W h_t with fixed context features h_t; θ = W (V, d)."""

    def __init__(self, seed: int, vocab: int = 6, dim: int = 4, t_w: int = 3, t_l: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(vocab, dim, generator=g, dtype=F64)
        shared = torch.randn(1, dim, generator=g, dtype=F64)  # a common context direction entangles g_w and g_l
        self.h_w = shared + 0.7 * torch.randn(t_w, dim, generator=g, dtype=F64)
        self.h_l = shared + 0.7 * torch.randn(t_l, dim, generator=g, dtype=F64)
        self.y_w = torch.randint(0, vocab, (t_w,), generator=g)
        self.y_l = torch.randint(0, vocab, (t_l,), generator=g)

    def logps(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lw = torch.log_softmax(self.h_w @ W.T, -1).gather(1, self.y_w[:, None]).sum()
        ll = torch.log_softmax(self.h_l @ W.T, -1).gather(1, self.y_l[:, None]).sum()
        return lw.reshape(1), ll.reshape(1)


@pytest.mark.parametrize("seed", [3, 10])  # 3: ρ < min(a, b) (ideal for DPO); 10: a < ρ < b (DPO lowers the chosen)
@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "rdpo", "simpo", "dpop", "cpo", "rpo", "rrhf", "orpo"])
def test_predicted_changes_match_one_sgd_step(name: str, seed: int) -> None:
    lm = TinyLM(seed=seed)
    W = lm.W.clone().requires_grad_(True)
    x_w, x_l = lm.logps(W)
    g_w = torch.autograd.grad(x_w.sum(), W, retain_graph=True)[0].flatten()
    g_l = torch.autograd.grad(x_l.sum(), W, retain_graph=True)[0].flatten()
    a, b, rho = g_w @ g_w, g_l @ g_l, g_w @ g_l
    ref_w, ref_l = x_w.detach() + 0.3, x_l.detach() - 0.2  # chosen below its reference: DPOP's penalty is active
    n_w, n_l = float(len(lm.y_w)), float(len(lm.y_l))
    args = (ref_w, ref_l, n_w, n_l)
    loss = pref.preference_loss(name, x_w, x_l, *args)
    (grad_W,) = torch.autograd.grad(loss.sum(), W)

    eta = 1e-4
    with torch.no_grad():
        new_w, new_l = lm.logps(W - eta * grad_W)
    d_w, d_l = pref.loss_partials(name, x_w.detach(), x_l.detach(), *args)
    pred_w, pred_l = pref.predicted_changes(d_w, d_l, a, b, rho)
    actual_w, actual_l = (new_w - x_w.detach()) / eta, (new_l - x_l.detach()) / eta
    for pred, actual in ((pred_w, actual_w), (pred_l, actual_l)):
        assert pred.abs().item() > 1e-6
        assert ((actual - pred).abs() / pred.abs()).item() < 0.05

    # the thresholds predict the signs: chosen falls iff ρ > c_w·a (q > 0), rejected rises iff ρ > c_l·b (p > 0)
    c_w, c_l = pref.threshold_coefficients(name, x_w.detach(), x_l.detach(), *args)
    p, q = -d_w, d_l
    if q.item() > 0:
        assert bool(actual_w < 0) == bool(rho > c_w * a)
    if p.item() > 0:
        assert bool(actual_l > 0) == bool(rho > c_l * b)
    if name == "dpo":  # the two seeds sit in different regimes of Yuan et al.'s table
        assert bool(actual_w < 0) == (seed == 10) and bool(rho > a) == (seed == 10)


def test_pairwise_normalized_never_lowers_chosen_or_raises_rejected() -> None:
    g = torch.Generator().manual_seed(1)
    g_w = torch.randn(32, 10, generator=g, dtype=F64)
    g_l = 0.9 * g_w * torch.rand(32, 1, generator=g, dtype=F64) * 5 + 0.3 * torch.randn(32, 10, generator=g, dtype=F64)
    d = pref.pairwise_normalized(g_w, g_l)
    torch.testing.assert_close(d, g_w / g_w.norm(dim=-1, keepdim=True) - g_l / g_l.norm(dim=-1, keepdim=True))
    kappa = F.cosine_similarity(g_w, g_l, dim=-1)
    torch.testing.assert_close((g_w * d).sum(-1), g_w.norm(dim=-1) * (1 - kappa))
    assert ((g_w * d).sum(-1) >= 0).all() and ((g_l * d).sum(-1) <= 0).all()
    # the plain DPO direction g_w − g_l lets one of them go the wrong way for these entangled pairs
    plain = g_w - g_l
    assert (((g_w * plain).sum(-1) < 0) | ((g_l * plain).sum(-1) > 0)).any()
