"""Razin et al. (ICLR 2024) §4.3, simulated: RFT needs time ∝ 1/STD² to raise the reward, SFT ∝ ln(1/STD).

A linear softmax policy over K labels with orthonormal inputs, so each input x has its own logits
θ_x ∈ R^K, starts with p(y*|x) log-spaced between ``min_initial_reward`` and ``max_initial_reward``
(the K − 1 wrong labels keep one fixed distribution). The reward is 1 for the correct label y* and 0
otherwise, so V(x) = p(y*|x) and the initial reward std is STD = sqrt(p(1 − p)). Both methods follow
exact gradient flow on the logits, all inputs as one batch: RFT ascends V(x) (logit gradient
p ⊙ (r − V), which is STD² on y*), SFT descends −ln p(y*|x) (logit gradient onehot(y*) − p). For each
input we measure the time t (= steps × learning rate for small-step gradient descent) until V(x)
reaches ``target_reward``. The claim: RFT's time grows like STD⁻² (log-log slope −2), SFT's only like
ln(1/STD).

The flow is integrated with an adaptive midpoint step that moves no logit by more than
``max_logit_change`` (see :func:`rftlab.tabular.time_to_target`): RFT times of 10⁶ cost ~700 steps,
and halving the step changes the times by < 0.1%.

CPU runtime of the default preset: about 4 s, most of it importing torch and matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rftlab.registry import experiment

METRICS = {
    "method": "rft (gradient ascent on V(x)) or sft (gradient descent on −ln p(y*|x))",
    "n_inputs": "number of inputs that reached the target (the fits use these)",
    "loglog_slope": "slope of ln(time to target) vs ln(initial reward std); theory: −2 for RFT, shallow "
    "for SFT (whose time is affine in ln(1/STD))",
    "loglog_r2": "R² of that log-log fit",
    "ln_slope, ln_intercept": "fit time = ln_intercept + ln_slope·ln(1/initial std); SFT theory: "
    "ln_slope = 2(K−1)/K when the wrong labels share one logit",
    "ln_r2": "R² of time vs ln(1/initial std); near 1 means logarithmic growth",
    "time_min": "shortest time to target over inputs (largest initial std)",
    "time_max": "longest time to target over inputs (smallest initial std)",
    "max_steps_used": "integrator steps the slowest input took",
    "inputs.parquet": "one row per (method, input): initial_reward, initial_reward_std, time_to_target, "
    "reached, steps",
    "curves.parquet": "V(t) for a few inputs: method, input, initial_reward_std, time, reward",
}


@experiment(name="rft-vs-sft-theory", paper="Razin et al. 2024", figure="§4.3 (RFT vs SFT, theory)",
            version=1, cpu_runtime="~4 s")
@dataclass(frozen=True)
class Config:
    num_labels: int = 10  # K, number of labels (outputs) of the softmax policy
    n_inputs: int = 25  # orthonormal inputs x, i.e. independent logit vectors θ_x
    min_initial_reward: float = 1e-6  # smallest initial p(y*|x) = V(x) (STD ≈ 1e-3)
    max_initial_reward: float = 0.1  # largest initial p(y*|x) (STD = 0.3); inputs are log-spaced in between
    other_logit_std: float = 1.0  # std of the K − 1 wrong labels' logits (drawn once, shared by all inputs)
    target_reward: float = 0.5  # level of V(x) whose first hitting time is measured
    max_logit_change: float = 0.02  # integrator step: largest change of any logit in one step
    max_steps: int = 100_000  # integrator steps per method before giving up (unreached → NaN time)
    n_curves: int = 4  # inputs (evenly spread over initial std) whose V(t) is recorded
    seed: int = 0  # seeds the wrong labels' logits
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        if self.num_labels < 2 or self.n_inputs < 3:
            raise ValueError("num_labels must be ≥ 2 and n_inputs ≥ 3 (the slopes need 3 points)")
        if not 0 < self.min_initial_reward < self.max_initial_reward < self.target_reward < 1:
            raise ValueError("need 0 < min_initial_reward < max_initial_reward < target_reward < 1")
        if self.max_logit_change <= 0 or self.max_steps < 1:
            raise ValueError("max_logit_change must be > 0 and max_steps ≥ 1")
        if not 0 <= self.n_curves <= self.n_inputs:
            raise ValueError("n_curves must be between 0 and n_inputs")


def fits(initial_std, time) -> dict[str, float]:
    """Least-squares fits of the hitting times: ln t = a + s·ln STD (s = loglog_slope) and
    t = a + b·ln(1/STD) (b = ln_slope), each with its R²."""
    import numpy as np

    def line(x, y) -> tuple[float, float, float]:
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        return float(slope), float(intercept), float(1 - residual.var() / y.var())

    log_std, time = np.log(np.asarray(initial_std)), np.asarray(time)
    s, _, r2 = line(log_std, np.log(time))
    b, a, ln_r2 = line(-log_std, time)
    return {"loglog_slope": s, "loglog_r2": r2, "ln_slope": b, "ln_intercept": a, "ln_r2": ln_r2}


def run(cfg: Config, run) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from rftlab import runtime, tabular

    # N ≤ thousands of K-vectors: every op is launch-bound, so the CPU beats any accelerator here.
    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    dtype = torch.float64  # p(y*) down to 1e-6 and times up to 1e6 need the headroom
    initial = torch.logspace(np.log10(cfg.min_initial_reward), np.log10(cfg.max_initial_reward),
                             cfg.n_inputs, dtype=dtype)
    other_logits = cfg.other_logit_std * torch.randn(cfg.num_labels - 1, dtype=dtype)
    logits = tabular.logits_with_correct_prob(initial, other_logits, label=0)
    rewards = torch.zeros(cfg.num_labels, dtype=dtype)
    rewards[0] = 1.0  # 0/1 reward: 1 for the correct label y* = 0
    initial_std = tabular.reward_std(logits, rewards)
    traced = torch.linspace(0, cfg.n_inputs - 1, cfg.n_curves).round().long().unique()
    gradients = {"rft": lambda th: tabular.rft_logit_grad(th, rewards),
                 "sft": lambda th: tabular.sft_logit_grad(th, 0)}

    tables, curves = [], []
    with run.progress(len(gradients), "rft-vs-sft-theory") as bar:
        for method, grad_fn in gradients.items():
            flow = tabular.time_to_target(
                logits, grad_fn, lambda th: tabular.expected_reward(th, rewards), cfg.target_reward,
                max_logit_change=cfg.max_logit_change, max_steps=cfg.max_steps, trace=traced)
            table = pd.DataFrame({
                "method": method, "input": np.arange(cfg.n_inputs), "initial_reward": initial.numpy(),
                "initial_reward_std": initial_std.numpy(), "time_to_target": flow.hit_time.numpy(),
                "reached": ~torch.isnan(flow.hit_time).numpy(), "steps": flow.steps.numpy(),
            })
            tables.append(table)
            for column, index in enumerate(traced.tolist()):
                curves.append(pd.DataFrame({
                    "method": method, "input": index, "initial_reward_std": float(initial_std[index]),
                    "time": flow.trace_time[:, column].numpy(), "reward": flow.trace_value[:, column].numpy(),
                }).drop_duplicates("time"))
            reached = table[table.reached]
            if len(reached) < len(table):
                run.info(f"{method}: {len(table) - len(reached)} inputs did not reach V = "
                         f"{cfg.target_reward} within max_steps = {cfg.max_steps}; raise max_steps or "
                         "max_logit_change")
            fit = fits(reached.initial_reward_std, reached.time_to_target) if len(reached) >= 3 else {}
            run.log(method=method, n_inputs=len(reached), **fit,
                    time_min=reached.time_to_target.min(), time_max=reached.time_to_target.max(),
                    max_steps_used=int(table.steps.max()))
            run.info(f"{method}: time to V = {cfg.target_reward} from {reached.time_to_target.min():.3g} "
                     f"to {reached.time_to_target.max():.3g}; log-log slope vs initial std "
                     f"{fit.get('loglog_slope', float('nan')):.2f}, R² of time vs ln(1/std) "
                     f"{fit.get('ln_r2', float('nan')):.3f}")
            bar.advance()
    run.write_table("inputs", pd.concat(tables, ignore_index=True))
    run.write_table("curves", pd.concat(curves, ignore_index=True))


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Left: time to reach the target vs initial reward std (log-log), fitted slopes in the legend,
    with c·STD⁻² and a + b·ln(1/STD) references. Right: V(t) of a few inputs for both methods."""
    import numpy as np
    import pandas as pd

    from rftlab import plotting
    from rftlab.results import read_json, read_table

    table = pd.concat([read_table(r, "inputs") for r in runs], ignore_index=True)
    table = table[table.reached]
    curves = read_table(runs[-1], "curves")
    target = read_json(runs[-1] / "config.json")["config"]["target_reward"]
    names = {"rft": "RFT", "sft": "SFT"}

    fig, axes = plotting.figure(ncols=2, width=4.3)
    left, right = axes[0]
    s = np.logspace(np.log10(table.initial_reward_std.min()) - 0.1,
                    np.log10(table.initial_reward_std.max()) + 0.1, 200)
    for method, group in table.groupby("method"):
        fit = fits(group.initial_reward_std, group.time_to_target)
        left.plot(group.initial_reward_std, group.time_to_target, "o", ms=4, color=plotting.COLORS[method],
                  label=f"{names[method]}  (slope {fit['loglog_slope']:.2f})", zorder=3)
        if method == "rft":  # c·STD⁻² with c fitted in log space
            scale = np.exp(np.mean(np.log(group.time_to_target * group.initial_reward_std**2)))
            left.plot(s, scale * s**-2.0, color=plotting.COLORS["bound"], lw=1, ls="--", label="∝ STD⁻²")
        else:
            affine = fit["ln_intercept"] + fit["ln_slope"] * np.log(1 / s)
            left.plot(s, affine, color=plotting.COLORS["bound"], lw=1, ls=":",
                      label=f"a + b·ln(1/STD)  (R² {fit['ln_r2']:.3f})")
    left.set(xscale="log", yscale="log", xlabel="initial reward std  STD(x)",
             ylabel=f"time to reach V(x) = {target:g}", title="Time to raise the reward vs initial std")
    left.legend(loc="upper right")

    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 3))]
    for i, (_, group) in enumerate(curves.groupby("input")):
        for method, trace in group.groupby("method"):
            right.plot(trace.time.clip(lower=1e-3), trace.reward, color=plotting.COLORS[method],
                       ls=styles[i % len(styles)], lw=1.3)
        right.annotate(f"STD(x) = {group.initial_reward_std.iloc[0]:.0e}", (0.012, group.reward.min()),
                       xytext=(0, 3), textcoords="offset points", fontsize=7, color="0.3")
    for method in ("rft", "sft"):
        right.plot([], [], color=plotting.COLORS[method], lw=2, label=names[method])
    right.axhline(target, color=plotting.COLORS["bound"], lw=0.8, ls=":")
    right.set(xscale="log", yscale="log", xlim=(1e-2, None), ylim=(curves.reward.min() / 30, 1),
              xlabel="gradient-flow time t", ylabel="expected reward V(x)", title="Reward during training")
    right.legend(loc="lower center", ncol=2)
    return [plotting.save(fig, out_dir, "rft_vs_sft_theory", fmt)]
