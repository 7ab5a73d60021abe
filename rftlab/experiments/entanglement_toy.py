"""Gradient entanglement on a toy softmax "language model" (Yuan et al., arXiv 2410.13828, §3–4).

A response y = (y_1..y_n) has log π(y|x) = Σ_t log softmax(z_t)[y_t], with either (1) learnable logits z_t ∈ R^V
per position, or (2) a learnable last layer W ∈ R^{V×d} on FIXED hidden states h_t (z_t = W h_t), the hidden
states drawn from a zero-mean Gaussian whose covariance has condition number ``condition_number``, reflected
into one half-space of its top direction (high condition number → the h_t align). Pairs are ``single-token``
(length-1 responses differing in their one token) or ``shared`` (length-n responses sharing a prefix of n−k
tokens and differing in the last k). Every pair is its own prompt with its own parameters (a batch of
independent replicas), so a batched step is exactly each pair's own gradient step and
a = ‖g_w‖², b = ‖g_l‖², ρ = ⟨g_w, g_l⟩ are exact per-pair quantities (one autograd call per response side).

Plain gradient descent on DPO, DPOP, CPO (sigmoid + NLL) and the pairwise-normalised update
θ ← θ + η(g_w/‖g_w‖ − g_l/‖g_l‖). Each step records the predicted first-order change of log π_w and log π_l
(``preference.predicted_changes`` × lr; ⟨g, direction⟩ × η for the normalised update), the observed change, and
the regime from ``threshold_coefficients`` (chosen falls iff ρ > c_w·a, rejected rises iff ρ > c_l·b).
The claims: single-token pairs with learnable logits are always in the ideal regime under DPO; shared-token
pairs have cosine → 1 and fall into the "both down" / "both up" regimes, exactly as (ρ, a, b) predict; the
normalised update never lowers the chosen nor raises the rejected log-prob to first order.

CPU runtime of the default preset: about 12 s (7 s of training).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rftlab.registry import experiment

NORMALIZED = "pairwise-normalized"
METRICS = {
    "loss": "update rule: a preference loss name (dpo, dpop, cpo, rpo, ...) or 'pairwise-normalized'",
    "setting": "'single-token' or 'shared' (n−k shared prefix tokens, k differing)",
    "params": "'logits' (learnable z_t) or 'last-layer' (learnable W on fixed hidden states)",
    "step": "gradient step (metrics measured before the step is taken)",
    "logps/chosen": "mean over pairs of log π(y_w|x) (summed over tokens)",
    "logps/rejected": "mean over pairs of log π(y_l|x)",
    "rewards/margins": "mean β·((x_w − x_w^0) − (x_l − x_l^0)), x^0 the log-probs at step 0 (the reference)",
    "grad/cosine": "mean over pairs of κ = ρ/√(ab)",
    "grad/rho_over_min_ab": "mean over pairs of ρ / min(a, b) (Yuan et al.'s Grad_Condition)",
    "regime/frac_chosen_down": "share of pairs predicted to lower the chosen log-prob this step",
    "regime/frac_rejected_up": "share of pairs predicted to raise the rejected log-prob this step",
    "sign_match": "share of pairs whose predicted signs of Δx_w and Δx_l both match the observed ones",
    "steps.parquet": "one row per (setting, params, loss, step, pair): a, b, rho, cosine, x_w, x_l, pred_dw, "
    "pred_dl, obs_dw, obs_dl, chosen_down, rejected_up",
}


@experiment(name="entanglement-toy", paper="Yuan et al. 2024", figure="§3–4 (toy models)", version=1,
            cpu_runtime="~12 s")
@dataclass(frozen=True)
class Config:
    vocab_size: int = 50  # V, the vocabulary
    hidden_dim: int = 16  # d, width of the fixed hidden states h_t (last-layer model)
    condition_number: float = 1000.0  # cond(Σ) of the hidden-state covariance; high = anisotropic, aligned h_t
    seq_len: int = 12  # n, response length of 'shared' pairs
    n_diff: int = 1  # k, tokens at the end of a 'shared' pair that differ between y_w and y_l
    n_pairs: int = 32  # B, preference pairs (independent prompts, each with its own parameters)
    settings: tuple[str, ...] = ("single-token", "shared")  # pair kinds to run
    param_kinds: tuple[str, ...] = ("logits", "last-layer")  # parametrisations to run
    losses: tuple[str, ...] = ("dpo", "dpop", "cpo", NORMALIZED)  # preference.METHODS names or the normalised step
    steps: int = 300  # gradient steps per (setting, params, loss)
    lr: float = 0.5  # η of plain gradient descent on the losses
    normalized_lr: float = 0.02  # η of the pairwise-normalised step (its direction has norm ≤ 2)
    beta: float = 0.1  # β of every loss
    dpop_lambda: float = 50.0  # λ of DPOP
    nll_alpha: float = 1.0  # α of the NLL term of cpo / rpo (per-token mean of the chosen)
    init_scale: float = 0.5  # std of the initial logits z_t (or of W·h_t)
    seed: int = 0  # seeds tokens, hidden states and initialisation
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        from rftlab.preference import get_method

        if not 1 <= self.n_diff < self.seq_len:
            raise ValueError("n_diff must be in 1..seq_len−1 so that shared pairs share at least one token")
        if self.vocab_size < 3 or self.condition_number < 1:
            raise ValueError("vocab_size must be ≥ 3 and condition_number ≥ 1")
        if bad := set(self.settings) - {"single-token", "shared"}:
            raise ValueError(f"unknown settings {sorted(bad)}: use 'single-token' and/or 'shared'")
        if bad := set(self.param_kinds) - {"logits", "last-layer"}:
            raise ValueError(f"unknown param_kinds {sorted(bad)}: use 'logits' and/or 'last-layer'")
        for name in self.losses:
            if name != NORMALIZED:
                get_method(name)  # raises with close matches for an unknown name


def _hparams(cfg: Config, name: str) -> dict[str, float]:
    from rftlab.preference import get_method

    values = {"beta": cfg.beta, "lam": cfg.dpop_lambda, "alpha": cfg.nll_alpha}
    return {k: v for k, v in values.items() if k in get_method(name).defaults}


def _pairs(cfg: Config, setting: str, generator):
    """(y_w, y_l), each (B, n) long: random y_w; y_l replaces its last k tokens by different ones."""
    import torch

    n, k = (1, 1) if setting == "single-token" else (cfg.seq_len, cfg.n_diff)
    y_w = torch.randint(cfg.vocab_size, (cfg.n_pairs, n), generator=generator)
    shift = torch.randint(1, cfg.vocab_size, (cfg.n_pairs, k), generator=generator)
    y_l = y_w.clone()
    y_l[:, n - k:] = (y_w[:, n - k:] + shift) % cfg.vocab_size
    return y_w, y_l


def _hidden_states(cfg: Config, n: int, generator):
    """(B, n, d) fixed hidden states: N(0, Σ), Σ = Q diag(λ) Qᵀ, λ ∝ (cond, 1, …, 1) (a spiked covariance whose
    condition number is cond), tr Σ = 1, each reflected
    into the half-space ⟨h, q_1⟩ ≥ 0 of the top direction q_1 (a cone, like LM representations), so that high
    anisotropy means aligned hidden states (cosines → 1), not just collinear ones."""
    import torch

    d = cfg.hidden_dim
    lam = torch.ones(d)
    lam[0] = cfg.condition_number
    lam = lam / lam.sum()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    coords = torch.randn(cfg.n_pairs, n, d, generator=generator) * lam.sqrt()
    return (coords * torch.where(coords[..., :1] < 0, -1.0, 1.0)) @ q.T


def _logps(kind: str, theta, hidden, y):
    """Summed log π(y|x) per pair, (B,): z = θ (logits) or z_t = W h_t (last layer)."""
    import torch

    z = theta if kind == "logits" else torch.einsum("bvd,bnd->bnv", theta, hidden)
    return torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)


def run(cfg: Config, run) -> None:
    import pandas as pd
    import torch

    from rftlab import runtime
    from rftlab.preference import (
        loss_partials,
        pairwise_normalized,
        predicted_changes,
        preference_loss,
        threshold_coefficients,
    )

    runtime.set_threads(cfg.threads)
    combos = [(s, p, m) for s in cfg.settings for p in cfg.param_kinds for m in cfg.losses]
    tables = []
    with run.progress(len(combos), "entanglement-toy") as bar:
        for setting, kind, name in combos:
            gen = torch.Generator().manual_seed(cfg.seed)  # same pairs and init for every loss
            y_w, y_l = _pairs(cfg, setting, gen)
            n = y_w.shape[1]
            hidden = _hidden_states(cfg, n, gen)
            if kind == "logits":
                theta = torch.randn(cfg.n_pairs, n, cfg.vocab_size, generator=gen) * cfg.init_scale
            else:
                theta = torch.randn(cfg.n_pairs, cfg.vocab_size, cfg.hidden_dim, generator=gen) * cfg.init_scale
            with torch.no_grad():
                ref_w, ref_l = _logps(kind, theta, hidden, y_w), _logps(kind, theta, hidden, y_l)
            lens = torch.full((cfg.n_pairs,), float(n))
            hp = {} if name == NORMALIZED else _hparams(cfg, name)
            rows = []
            for step in range(cfg.steps):
                theta.requires_grad_(True)
                x_w, x_l = _logps(kind, theta, hidden, y_w), _logps(kind, theta, hidden, y_l)
                (g_w,) = torch.autograd.grad(x_w.sum(), theta, retain_graph=True)  # per pair: θ[b] is pair b's
                (g_l,) = torch.autograd.grad(x_l.sum(), theta)
                theta = theta.detach()
                x_w, x_l = x_w.detach(), x_l.detach()
                g_w, g_l = g_w.reshape(cfg.n_pairs, -1), g_l.reshape(cfg.n_pairs, -1)
                a, b, rho = g_w.pow(2).sum(1), g_l.pow(2).sum(1), (g_w * g_l).sum(1)
                if name == NORMALIZED:
                    direction = pairwise_normalized(g_w, g_l)  # ascent direction
                    pred_w = cfg.normalized_lr * (g_w * direction).sum(1)
                    pred_l = cfg.normalized_lr * (g_l * direction).sum(1)
                    chosen_down, rejected_up = pred_w < 0, pred_l > 0
                    update = cfg.normalized_lr * direction
                else:
                    args = (name, x_w, x_l, ref_w, ref_l, lens, lens)
                    d_w, d_l = loss_partials(*args, **hp)
                    dw, dl = predicted_changes(d_w, d_l, a, b, rho)
                    pred_w, pred_l = cfg.lr * dw, cfg.lr * dl
                    c_w, c_l = threshold_coefficients(*args, **hp)
                    chosen_down, rejected_up = rho > c_w * a, rho > c_l * b
                    update = -cfg.lr * (d_w[:, None] * g_w + d_l[:, None] * g_l)  # −η ∇θ L, chain rule
                theta = theta + update.reshape(theta.shape)
                with torch.no_grad():
                    new_w, new_l = _logps(kind, theta, hidden, y_w), _logps(kind, theta, hidden, y_l)
                obs_w, obs_l = new_w - x_w, new_l - x_l
                match = (torch.sign(pred_w) == torch.sign(obs_w)) & (torch.sign(pred_l) == torch.sign(obs_l))
                cosine = rho / (a * b).sqrt().clamp_min(1e-30)
                margin = cfg.beta * ((x_w - ref_w) - (x_l - ref_l))
                loss = None if name == NORMALIZED else preference_loss(*args, **hp).mean().item()
                run.log({"loss": name, "setting": setting, "params": kind, "step": step,
                         "logps/chosen": x_w.mean().item(), "logps/rejected": x_l.mean().item(),
                         "rewards/margins": margin.mean().item(), "grad/cosine": cosine.mean().item(),
                         "grad/rho_over_min_ab": (rho / torch.minimum(a, b)).mean().item(),
                         "regime/frac_chosen_down": chosen_down.float().mean().item(),
                         "regime/frac_rejected_up": rejected_up.float().mean().item(),
                         "sign_match": match.float().mean().item(), "loss_value": loss})
                rows.append({"step": step, "pair": torch.arange(cfg.n_pairs), "a": a, "b": b, "rho": rho,
                             "cosine": cosine, "x_w": x_w, "x_l": x_l, "pred_dw": pred_w, "pred_dl": pred_l,
                             "obs_dw": obs_w, "obs_dl": obs_l, "chosen_down": chosen_down,
                             "rejected_up": rejected_up})
            table = pd.DataFrame({k: torch.cat([r[k] for r in rows]).numpy() if k != "step" else
                                  [r["step"] for r in rows for _ in range(cfg.n_pairs)] for k in rows[0]})
            tables.append(table.assign(setting=setting, params=kind, loss=name))
            bar.advance()
    steps = pd.concat(tables, ignore_index=True)
    run.write_table("steps", steps)
    dpo = steps[steps.loss == "dpo"]
    for (setting, kind), group in dpo.groupby(["setting", "params"]):
        run.info(f"dpo {setting}/{kind}: cosine {group.cosine.mean():.3f}, chosen down in "
                 f"{group.chosen_down.mean():.0%} of (step, pair), rejected up in {group.rejected_up.mean():.0%}")


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Top: chosen/rejected log-prob per loss, per (setting, params). Bottom: cosine over steps, and
    predicted vs observed Δ log π for every (step, pair)."""
    import numpy as np
    import pandas as pd

    from rftlab import plotting
    from rftlab.results import read_metrics, read_table

    metrics = pd.concat([read_metrics(r) for r in runs], ignore_index=True)
    steps = pd.concat([read_table(r, "steps") for r in runs], ignore_index=True)
    panels = list(metrics.groupby(["setting", "params"], sort=False).groups)
    losses = list(dict.fromkeys(metrics["loss"]))
    colors = dict(zip(losses, ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"], strict=False))
    fig, axes = plotting.figure(ncols=max(len(panels), 2), nrows=2, width=3.6, height=3.0)
    for ax, (setting, kind) in zip(axes[0], panels, strict=False):
        sub = metrics[(metrics.setting == setting) & (metrics.params == kind)]
        for rank, (name, group) in enumerate(sub.groupby("loss", sort=False)):  # first loss on top
            style = {"color": colors[name], "zorder": 10 - rank}
            ax.plot(group.step, group["logps/chosen"], lw=2.2 if rank == 0 else 1.3, label=name, **style)
            ax.plot(group.step, group["logps/rejected"], lw=1.8 if rank == 0 else 1.1, ls="--", **style)
        ax.set(title=f"{setting} pairs, {kind}", xlabel="step", ylabel="log π  (solid: chosen, dashed: rejected)")
    axes[0][0].legend(loc="lower left")
    cos_ax, scatter_ax = axes[1][0], axes[1][1]
    dpo = metrics[metrics.loss == losses[0]]
    for setting, kind in panels:
        group = dpo[(dpo.setting == setting) & (dpo.params == kind)]
        cos_ax.plot(group.step, group["grad/cosine"], lw=1.4, label=f"{setting}, {kind}")
    cos_ax.axhline(0, color="black", lw=0.6)
    cos_ax.set(title=f"cos(g_w, g_l) under {losses[0]}", xlabel="step", ylabel="mean cosine", ylim=(-1.05, 1.05))
    cos_ax.legend(loc="lower left")
    sample = steps.sample(n=min(len(steps), 20000), random_state=0)
    for col, marker, label in (("dw", "o", "chosen"), ("dl", "x", "rejected")):
        scatter_ax.scatter(sample[f"pred_{col}"], sample[f"obs_{col}"], s=4, alpha=0.35, marker=marker,
                           label=label, linewidths=0.6)
    lim = np.nanmax(np.abs(sample[["pred_dw", "pred_dl", "obs_dw", "obs_dl"]].to_numpy())) * 1.05
    scatter_ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
    scatter_ax.set(title="first-order prediction vs observed", xlabel="predicted Δ log π",
                   ylabel="observed Δ log π", xscale="symlog", yscale="symlog")
    scatter_ax.set_xscale("symlog", linthresh=1e-3)
    scatter_ax.set_yscale("symlog", linthresh=1e-3)
    ticks = [t for t in (-10, -0.1, -1e-3, 0, 1e-3, 0.1, 10) if abs(t) <= lim]
    scatter_ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    scatter_ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    scatter_ax.legend(loc="upper left")
    for ax in axes[1][2:]:
        regime = metrics[metrics.loss == losses[0]].groupby(["setting", "params"], sort=False)
        shares = regime[["regime/frac_chosen_down", "regime/frac_rejected_up"]].mean()
        labels = [f"{s}\n{p}" for s, p in shares.index]
        xs = np.arange(len(labels))
        ax.bar(xs - 0.2, shares["regime/frac_chosen_down"], 0.4, label="chosen ↓", color="#d62728")
        ax.bar(xs + 0.2, shares["regime/frac_rejected_up"], 0.4, label="rejected ↑", color="#ff7f0e")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set(title=f"predicted regime under {losses[0]}", ylabel="share of (step, pair)", ylim=(0, 1))
        ax.legend(loc="upper left")
        break
    for ax in axes[1][3:]:
        ax.axis("off")
    return [plotting.save(fig, out_dir, "entanglement_toy", fmt)]
