"""Margin-based preference losses and their gradient-entanglement thresholds (Yuan et al., arXiv 2410.13828).

Shapes: B preference pairs. Every input is a (B,) tensor: ``logp_chosen`` = x_w = log π_θ(y_w|x) and
``logp_rejected`` = x_l = log π_θ(y_l|x) are SUMMED sequence log-probs; ``ref_logp_*`` are the same under the
frozen reference; ``len_*`` are response token counts |y| (tensors or plain numbers). Methods that define a
per-token average divide inside. Every loss is per pair, (B,); reduce it yourself.

Yuan et al.'s general form of a margin-based loss is

    L = −m( h_w(x_w) − h_l(x_l) ) − Λ(x_w)

with m an increasing link, h_w / h_l increasing transforms (reference offset, length normalisation) and Λ an
optional explicit term on the chosen response (SFT/NLL). All methods live in one table, ``METHODS``, of
``PreferenceMethod`` entries (name, citation, formula, default hyperparameters, per-pair loss function).

Gradient entanglement. Write g_w = ∇_θ x_w, g_l = ∇_θ x_l, a = ‖g_w‖², b = ‖g_l‖², ρ = ⟨g_w, g_l⟩. For a
per-pair loss L(x_w, x_l), gradient flow dθ = −∇_θ L = −(∂L/∂x_w) g_w − (∂L/∂x_l) g_l moves the log-probs by

    dx_w = ⟨g_w, dθ⟩ = −(∂L/∂x_w)·a − (∂L/∂x_l)·ρ
    dx_l = ⟨g_l, dθ⟩ = −(∂L/∂x_w)·ρ − (∂L/∂x_l)·b            (``predicted_changes``)

With p = −∂L/∂x_w and q = ∂L/∂x_l (both > 0 for a margin loss that still pushes): dx_w < 0 ⇔ ρ > (p/q)·a and
dx_l > 0 ⇔ ρ > (q/p)·b. In the general form p = m'h_w' + Λ' and q = m'h_l', so p/q = (h_w' + Λ'/m')/h_l'
(``threshold_coefficients`` returns (p/q, q/p), taking p and q from autograd on the loss itself). DPO gives
(1, 1): the chosen falls iff ρ > a, the rejected rises iff ρ > b.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

from rftlab.errors import RftlabError

__all__ = [
    "ALIASES",
    "METHODS",
    "PreferenceMethod",
    "get_method",
    "loss_partials",
    "pairwise_normalized",
    "predicted_changes",
    "preference_loss",
    "threshold_coefficients",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pair:
    """One batch of preference pairs as a loss function sees it: all (B,), lengths already tensors (or None)."""

    w: Tensor
    l: Tensor
    ref_w: Tensor | None
    ref_l: Tensor | None
    len_w: Tensor | None
    len_l: Tensor | None

    def margin_vs_ref(self) -> Tensor:
        """(x_w − x_w^ref) − (x_l − x_l^ref): DPO's implicit-reward margin over β."""
        return (self.w - self.ref_w) - (self.l - self.ref_l)

    def avg_w(self) -> Tensor:
        return self.w / self.len_w

    def avg_l(self) -> Tensor:
        return self.l / self.len_l


@dataclass(frozen=True)
class PreferenceMethod:
    """One margin-based preference loss: the general form's pieces plus a per-pair loss ``fn(pair, **hparams)``."""

    name: str
    citation: str
    formula: str
    defaults: Mapping[str, float]
    fn: Callable[..., Tensor]
    needs_ref: bool = False
    needs_lengths: bool = False
    aliases: tuple[str, ...] = field(default=())
    note: str = ""


# ------------------------------------------------------------------------------------------- loss functions
def _dpo(p: Pair, beta: float) -> Tensor:
    return -F.logsigmoid(beta * p.margin_vs_ref())


def _ipo(p: Pair, beta: float) -> Tensor:
    h = (p.w - p.ref_w) / p.len_w - (p.l - p.ref_l) / p.len_l
    return (h - 1.0 / (2.0 * beta)) ** 2


def _slic(p: Pair, beta: float, sft_weight: float) -> Tensor:
    h = p.margin_vs_ref() if p.ref_w is not None else p.w - p.l
    return F.relu(1.0 - beta * h) - sft_weight * p.w


def _rdpo(p: Pair, beta: float, alpha: float) -> Tensor:
    return -F.logsigmoid(beta * p.margin_vs_ref() - alpha * (p.len_w - p.len_l))


def _simpo(p: Pair, beta: float, gamma: float) -> Tensor:
    return -F.logsigmoid(beta * p.avg_w() - beta * p.avg_l() - gamma)


def _dpop(p: Pair, beta: float, lam: float) -> Tensor:
    return -F.logsigmoid(beta * (p.margin_vs_ref() - lam * F.relu(p.ref_w - p.w)))


def _cpo(p: Pair, beta: float, alpha: float) -> Tensor:
    return -F.logsigmoid(beta * (p.w - p.l)) - alpha * p.avg_w()


def _rpo(p: Pair, beta: float, alpha: float) -> Tensor:
    return -F.logsigmoid(beta * p.margin_vs_ref()) - alpha * p.avg_w()


def _rrhf(p: Pair, alpha: float) -> Tensor:
    return F.relu(p.avg_l() - p.avg_w()) - alpha * p.avg_w()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _orpo(p: Pair, lam: float) -> Tensor:
    aw, al = p.avg_w(), p.avg_l()
    log_odds = (aw - al) - (_log1mexp(aw) - _log1mexp(al))
    return -aw - lam * F.logsigmoid(log_odds)


# ------------------------------------------------------------------------------------------------- table
_ENTRIES = [
    PreferenceMethod(
        name="dpo",
        citation="Rafailov et al. 2023, arXiv 2305.18290; TRL DPOTrainer loss_type='sigmoid'",
        formula="−log σ(β·((x_w − x_w^ref) − (x_l − x_l^ref)))",
        defaults={"beta": 0.1},
        fn=_dpo,
        needs_ref=True,
        aliases=("sigmoid",),
        note="m = log σ(β·), h = identity minus the reference; thresholds (1, 1).",
    ),
    PreferenceMethod(
        name="ipo",
        citation="Azar et al. 2023, arXiv 2310.12036; TRL DPOTrainer loss_type='ipo' (per-token averaged log-probs)",
        formula="(h − 1/(2β))², h = (x_w − x_w^ref)/|y_w| − (x_l − x_l^ref)/|y_l|",
        defaults={"beta": 0.1},
        fn=_ipo,
        needs_ref=True,
        needs_lengths=True,
        note="TRL averages policy and reference log-probs per token for IPO; thresholds (|y_l|/|y_w|, |y_w|/|y_l|)"
        " while h < 1/(2β), after which m' changes sign.",
    ),
    PreferenceMethod(
        name="slic",
        citation="Zhao et al. 2023 (SLiC-HF), arXiv 2305.10425; TRL DPOTrainer loss_type='hinge'",
        formula="relu(1 − β·h) − λ_sft·x_w, h = (x_w − x_w^ref) − (x_l − x_l^ref) (or x_w − x_l without refs)",
        defaults={"beta": 0.1, "sft_weight": 0.0},
        fn=_slic,
        aliases=("hinge",),
        note="With refs this is TRL's hinge (margin δ = 1/β on the reference-offset margin); without refs it is"
        " SLiC-HF's reference-free calibration loss. The SFT term is SLiC-HF's summed sequence NLL on y_w.",
    ),
    PreferenceMethod(
        name="rdpo",
        citation="Park et al. 2024 (R-DPO), arXiv 2403.19159",
        formula="−log σ(β·((x_w − x_w^ref) − (x_l − x_l^ref)) − α·(|y_w| − |y_l|))",
        defaults={"beta": 0.1, "alpha": 0.2},
        fn=_rdpo,
        needs_ref=True,
        needs_lengths=True,
        note="Sign as in Park et al. (a longer chosen response is penalised); α = 0.2 as in Yuan et al.'s recipe."
        " Thresholds as DPO: only m' changes.",
    ),
    PreferenceMethod(
        name="simpo",
        citation="Meng et al. 2024 (SimPO), arXiv 2405.14734; TRL CPOTrainer loss_type='simpo', cpo_alpha=0",
        formula="−log σ(β·x_w/|y_w| − β·x_l/|y_l| − γ)",
        defaults={"beta": 0.1, "gamma": 0.5},
        fn=_simpo,
        needs_lengths=True,
        note="Reference-free. Defaults are TRL's (and Yuan et al.'s runs), not the SimPO paper's β≈2–2.5.",
    ),
    PreferenceMethod(
        name="dpop",
        citation="Pal et al. 2024 (Smaug / DPO-Positive), arXiv 2402.13228",
        formula="−log σ(β·((x_w − x_w^ref) − (x_l − x_l^ref) − λ·relu(x_w^ref − x_w)))",
        defaults={"beta": 0.1, "lam": 50.0},
        fn=_dpop,
        needs_ref=True,
        note="λ = 50 as in Smaug and Yuan et al.'s code ('pdpo'); thresholds (1+λ, 1/(1+λ)) while x_w < x_w^ref.",
    ),
    PreferenceMethod(
        name="cpo",
        citation="Xu et al. 2024 (CPO), arXiv 2401.08417; TRL CPOTrainer loss_type='sigmoid'",
        formula="−log σ(β·(x_w − x_l)) − α·x_w/|y_w|",
        defaults={"beta": 0.1, "alpha": 1.0},
        fn=_cpo,
        needs_lengths=True,
        note="TRL's CPO: reference-free sigmoid on summed log-probs plus α × per-token NLL of y_w (TRL's batch"
        " token-mean becomes a per-pair token mean here). The reference-anchored DPO + NLL variant is 'rpo'.",
    ),
    PreferenceMethod(
        name="rpo",
        citation="Pang et al. 2024 (Iterative RPO), arXiv 2404.19733; TRL DPOConfig rpo_alpha",
        formula="−log σ(β·((x_w − x_w^ref) − (x_l − x_l^ref))) − α·x_w/|y_w|",
        defaults={"beta": 0.1, "alpha": 1.0},
        fn=_rpo,
        needs_ref=True,
        needs_lengths=True,
        note="DPO + per-token NLL of y_w; thresholds (1 + Λ'/m', 1/(1 + Λ'/m')).",
    ),
    PreferenceMethod(
        name="rrhf",
        citation="Yuan et al. 2023 (RRHF), arXiv 2304.05302; Understand_MarginPO's MyCPOTrainer",
        formula="relu(x_l/|y_l| − x_w/|y_w|) − α·x_w/|y_w|",
        defaults={"alpha": 1.0},
        fn=_rrhf,
        needs_lengths=True,
        note="Pairwise ranking on per-token averaged log-probs plus α × per-token NLL (cpo_alpha = 1 as in Yuan et"
        " al.'s runs). Once ranked, only the NLL acts: the rejected rises whenever ρ > 0.",
    ),
    PreferenceMethod(
        name="orpo",
        citation="Hong et al. 2024 (ORPO), arXiv 2403.07691; TRL ORPOTrainer",
        formula="−x_w/|y_w| − λ·log σ(log odds(x̄_w) − log odds(x̄_l)), x̄ = x/|y|, odds(x̄) = e^x̄/(1 − e^x̄)",
        defaults={"lam": 0.1},
        fn=_orpo,
        needs_lengths=True,
        note="λ is TRL's ORPOConfig.beta (default 0.1); per-token averaged log-probs as in TRL.",
    ),
]

METHODS: Mapping[str, PreferenceMethod] = MappingProxyType({m.name: m for m in _ENTRIES})
ALIASES: Mapping[str, str] = MappingProxyType({alias: m.name for m in _ENTRIES for alias in m.aliases})


def get_method(name: str) -> PreferenceMethod:
    """Look a method up by name or alias; an unknown name raises RftlabError with the closest matches."""
    key = ALIASES.get(name, name)
    if key in METHODS:
        return METHODS[key]
    known = sorted([*METHODS, *ALIASES])
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise RftlabError(f"unknown preference loss {name!r}.{hint} Known: {', '.join(known)}.")


# ------------------------------------------------------------------------------------------------ public
def _as_tensor(x: Tensor | float | int | None, like: Tensor) -> Tensor | None:
    if x is None:
        return None
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _pair_and_hparams(
    method: PreferenceMethod,
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_logp_chosen: Tensor | None,
    ref_logp_rejected: Tensor | None,
    len_chosen: Tensor | float | None,
    len_rejected: Tensor | float | None,
    hparams: Mapping[str, float],
) -> tuple[Pair, dict[str, float]]:
    if (ref_logp_chosen is None) != (ref_logp_rejected is None):
        raise RftlabError(f"{method.name}: pass both ref_logp_chosen and ref_logp_rejected, or neither.")
    if method.needs_ref and ref_logp_chosen is None:
        raise RftlabError(
            f"{method.name} needs reference log-probs: pass ref_logp_chosen and ref_logp_rejected "
            f"(summed log π_ref of each response)."
        )
    if method.needs_lengths and (len_chosen is None or len_rejected is None):
        raise RftlabError(f"{method.name} needs response lengths: pass len_chosen and len_rejected (token counts).")
    unknown = sorted(set(hparams) - set(method.defaults))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(method.defaults), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RftlabError(
            f"{method.name} has no hyperparameter {unknown[0]!r}.{hint} It takes: {', '.join(method.defaults)}."
        )
    pair = Pair(
        w=logp_chosen,
        l=logp_rejected,
        ref_w=_as_tensor(ref_logp_chosen, logp_chosen),
        ref_l=_as_tensor(ref_logp_rejected, logp_chosen),
        len_w=_as_tensor(len_chosen, logp_chosen),
        len_l=_as_tensor(len_rejected, logp_chosen),
    )
    return pair, {**method.defaults, **hparams}


def preference_loss(
    name: str,
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_logp_chosen: Tensor | None = None,
    ref_logp_rejected: Tensor | None = None,
    len_chosen: Tensor | float | None = None,
    len_rejected: Tensor | float | None = None,
    **hparams: float,
) -> Tensor:
    """Per-pair loss (B,) of method ``name`` (see ``METHODS``) from summed sequence log-probs (B,).

    Reference log-probs are required where the method is reference-anchored (dpo, ipo, rdpo, dpop, rpo), optional
    for slic, and ignored by the reference-free methods (simpo, cpo, rrhf, orpo). Lengths are required where the
    method normalises per token or penalises length. ``hparams`` override the entry's ``defaults``.
    """
    method = get_method(name)
    pair, hp = _pair_and_hparams(
        method, logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, len_chosen, len_rejected, hparams
    )
    return method.fn(pair, **hp)


def loss_partials(
    name: str,
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_logp_chosen: Tensor | None = None,
    ref_logp_rejected: Tensor | None = None,
    len_chosen: Tensor | float | None = None,
    len_rejected: Tensor | float | None = None,
    **hparams: float,
) -> tuple[Tensor, Tensor]:
    """(∂L/∂x_w, ∂L/∂x_l), each (B,), of the per-pair loss at the given summed log-probs, by autograd.

    Pairs are independent, so the gradient of Σ_b L_b with respect to x_w[b] is ∂L_b/∂x_w[b]. Reference
    log-probs and lengths are treated as constants. The returned tensors are detached.
    """
    with torch.enable_grad():
        w = logp_chosen.detach().clone().requires_grad_(True)
        l = logp_rejected.detach().clone().requires_grad_(True)
        ref_w = None if ref_logp_chosen is None else ref_logp_chosen.detach()
        ref_l = None if ref_logp_rejected is None else ref_logp_rejected.detach()
        loss = preference_loss(name, w, l, ref_w, ref_l, len_chosen, len_rejected, **hparams)
        d_w, d_l = torch.autograd.grad(loss.sum(), (w, l), allow_unused=True)
    d_w = torch.zeros_like(w) if d_w is None else d_w
    d_l = torch.zeros_like(l) if d_l is None else d_l
    return d_w.detach(), d_l.detach()


def threshold_coefficients(
    name: str,
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_logp_chosen: Tensor | None = None,
    ref_logp_rejected: Tensor | None = None,
    len_chosen: Tensor | float | None = None,
    len_rejected: Tensor | float | None = None,
    **hparams: float,
) -> tuple[Tensor, Tensor]:
    """(c_chosen, c_rejected), each (B,): chosen log-prob falls iff ρ > c_chosen·a, rejected rises iff ρ > c_rejected·b.

    With p = −∂L/∂x_w and q = ∂L/∂x_l (``loss_partials``), c_chosen = p/q and c_rejected = q/p; in Yuan et al.'s
    general form these are (h_w' + Λ'/m')/h_l' and h_l'/(h_w' + Λ'/m'). Derivation: dx_w = p·a − q·ρ < 0 ⇔
    ρ > (p/q)·a when q > 0, and dx_l = p·ρ − q·b > 0 ⇔ ρ > (q/p)·b when p > 0 (module docstring).

    Edge cases, left to IEEE arithmetic: q = 0 (a hinge/ranking term satisfied, only an SFT term acting) gives
    c_chosen = inf (the chosen cannot fall) and c_rejected = 0 (the rejected rises whenever ρ > 0). If q < 0
    (IPO past its target margin 1/(2β)) the coefficient is negative and the chosen inequality flips (falls iff
    ρ < c_chosen·a); likewise for p < 0 and the rejected one. p = q = 0 gives nan (no gradient at all).
    """
    d_w, d_l = loss_partials(
        name, logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, len_chosen, len_rejected, **hparams
    )
    p, q = -d_w, d_l
    return p / q, q / p


def predicted_changes(
    dL_dw: Tensor | float, dL_dl: Tensor | float, a: Tensor | float, b: Tensor | float, rho: Tensor | float
) -> tuple[Tensor | float, Tensor | float]:
    """First-order change of (x_w, x_l) per unit SGD step θ ← θ − η∇L, i.e. Δx ≈ η·(returned value).

    dx_w = −(∂L/∂x_w)·a − (∂L/∂x_l)·ρ and dx_l = −(∂L/∂x_w)·ρ − (∂L/∂x_l)·b, with a = ‖g_w‖², b = ‖g_l‖²,
    ρ = ⟨g_w, g_l⟩ (Yuan et al.'s gradient-flow identities, for any loss that depends on θ only through x_w, x_l).
    Works elementwise on (B,) tensors or on floats.
    """
    dx_w = -dL_dw * a - dL_dl * rho
    dx_l = -dL_dw * rho - dL_dl * b
    return dx_w, dx_l


def pairwise_normalized(g_w: Tensor, g_l: Tensor, eps: float = 1e-12) -> Tensor:
    """Yuan et al.'s normalised preference update direction g_w/‖g_w‖ − g_l/‖g_l‖ (norms over the last dim).

    Use it as an ascent direction on the preference, θ ← θ + η·d (the descent step of the DPO-like margin loss
    with each response's gradient normalised). To first order it moves x_w by ⟨g_w, d⟩ = ‖g_w‖(1 − κ) ≥ 0 and
    x_l by ⟨g_l, d⟩ = −‖g_l‖(1 − κ) ≤ 0 with κ the cosine of g_w and g_l: the chosen never falls and the rejected
    never rises, whatever the norms, so the entanglement regimes a < ρ < b and b < ρ < a cannot occur.
    g_w, g_l: (P,) or (B, P) flattened gradients; ``eps`` guards a zero norm.
    """
    n_w = g_w.norm(dim=-1, keepdim=True).clamp_min(eps)
    n_l = g_l.norm(dim=-1, keepdim=True).clamp_min(eps)
    return g_w / n_w - g_l / n_l


REGIMES = ("ideal", "chosen_down", "rejected_up", "both", "inactive")


def classify_regimes(a, b, rho, p, q, rtol: float = 1e-5):
    """Gradient-flow regime of each pair, (B,) strings, from a = ‖g_w‖², b = ‖g_l‖², ρ = ⟨g_w, g_l⟩ and the loss
    partials p = −∂L/∂x_w, q = ∂L/∂x_l, all (B,) arrays.

    dx_w ∝ p·a − q·ρ and dx_l ∝ p·ρ − q·b. With c_w = p/q, c_l = q/p (:func:`threshold_coefficients`): for q > 0 the
    chosen falls iff ρ > c_w·a, for q < 0 iff ρ < c_w·a, for q = 0 iff p < 0; for p > 0 the rejected rises iff
    ρ > c_l·b, for p < 0 iff ρ < c_l·b, for p = 0 iff q < 0. Ties within relative ``rtol`` of the threshold count
    as crossing it, as in ``rftlab.diagnostics.pair_gradient_stats`` (so with c = 1 the result equals its
    ``regime`` column). "inactive": p = q = 0 (or nan), the loss exerts no force on the pair (a satisfied hinge).
    Otherwise "ideal", "chosen_down", "rejected_up" or "both", exactly one per pair.
    """
    import numpy as np

    a, b, rho, p, q = (np.asarray(v, dtype=np.float64) for v in (a, b, rho, p, q))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_w, t_l = (p / q) * a, (q / p) * b
        chosen_down = np.where(q > 0, rho >= t_w - rtol * np.abs(t_w),
                               np.where(q < 0, rho <= t_w + rtol * np.abs(t_w), (p < 0) & (a > 0)))
        rejected_up = np.where(p > 0, rho >= t_l - rtol * np.abs(t_l),
                               np.where(p < 0, rho <= t_l + rtol * np.abs(t_l), (q < 0) & (b > 0)))
    inactive = ((p == 0) & (q == 0)) | np.isnan(p) | np.isnan(q)
    return np.select([inactive, chosen_down & rejected_up, chosen_down, rejected_up],
                     ["inactive", "both", "chosen_down", "rejected_up"], "ideal")
