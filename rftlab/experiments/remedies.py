"""Remedies that do not rescue vanishing gradients: Razin et al. (ICLR 2024), §5.1 and Table 2. A larger
learning rate, a higher sampling temperature or an entropy bonus leaves RFT far behind SFT→RFT on the tasks
with many small-std inputs; an initial SFT phase closes the gap.

Stages, per swept task, all from one cached pretrained model (grue's: the same task, model and pretraining
settings hit the same cache): per-input statistics of the pretrained model; RFT (PPO as in grue) with the
default settings and with one knob at a time moved away from them (learning rate ×{3, 10}, rollout
temperature {1.5, 2}, entropy coefficient {0.01, 0.1}; the ×1 / τ = 1 / 0 rows are plain RFT); SFT and
SFT→RFT; the same statistics after each. ``settings.parquet`` holds Table 2: the train reward per task and
setting, the share of the gap between RFT and SFT→RFT each setting closes, and the share of inputs with
reward std < 0.05 before and after. Rewards are measured at the statistics' temperature (1), so every row
describes the policy itself, whatever temperature its rollouts used.

CPU runtime of the default preset: about 21 min (two tasks, one core).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rftlab.grue_stages import SMALL_STD, PretrainConfig, TasksConfig, TaskStages, load_task, pretrained_model
from rftlab.grue_stages import check_inputs as check  # noqa: F401 (the registry calls it before a run folder exists)
from rftlab.lm_config import LMConfig
from rftlab.registry import experiment
from rftlab.rl.settings import RFTConfig, SamplingConfig, SFTConfig

KNOB_LABELS = {"lr": "learning rate ×{:g}", "temperature": "temperature {:g}", "ent_coef": "entropy coef. {:g}"}

TRAINING_OPTIONS = True  # trains under `rftlab run --precision` and `--compile` (bf16 autocast, torch.compile)

METRICS = {
    "task, stage, step": "task; stage (rft, lr_x3, temperature_1.5, ent_coef_0.1, …, sft, sft_rft); step in it",
    "reward/mean, reward/std, kl, entropy, …": "rollout and PPO statistics per step, as in grue",
    "inputs.parquet": "per (task, stage, input_id): reward_mean, reward_std, rewards (K) and a sample, as grue",
    "settings.parquet": "Table 2, per (task, setting, seed): knob, value, reward (mean train reward), gap_closed "
    "= (reward − RFT)/(SFT→RFT − RFT), frac_small_std_before / _after (std < 0.05), gain_small_std (mean gain "
    "of the inputs with small initial std)",
}


@experiment(name="remedies", paper="Razin et al. 2024", figure="§5.1 Table 2", version=1, cpu_runtime="~21 min")
@dataclass(frozen=True)
class Config:
    tasks: TasksConfig = field(default_factory=TasksConfig)  # all of them pretrain the shared model
    sweep: tuple[str, ...] = ("iwslt", "totto")  # tasks the remedies run on (⊆ tasks.names)
    model: LMConfig = field(default_factory=lambda: LMConfig(n_layer=2, n_embd=128, n_head=4, n_positions=160))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    stats: SamplingConfig = field(default_factory=SamplingConfig)
    rft: RFTConfig = field(default_factory=RFTConfig)  # plain RFT; every remedy changes one of its fields
    sft: SFTConfig = field(default_factory=SFTConfig)  # the SFT phase of SFT→RFT
    lr_scales: tuple[float, ...] = (1.0, 3.0, 10.0)  # learning rate = scale · rft.lr
    temperatures: tuple[float, ...] = (1.0, 1.5, 2.0)  # rollout sampling temperature τ
    ent_coefs: tuple[float, ...] = (0.0, 0.01, 0.1)  # entropy bonus coefficient (PPO loss − c·entropy)
    seed: int = 0  # seeds pretraining, sampling and finetuning
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        missing = [t for t in self.sweep if t not in self.tasks.names]
        if missing or not self.sweep:
            raise ValueError(f"sweep {list(self.sweep)} must name tasks of tasks.names {list(self.tasks.names)}")
        for name, values, low in (("lr_scales", self.lr_scales, 0.0), ("temperatures", self.temperatures, 0.0)):
            if any(v <= low for v in values):
                raise ValueError(f"{name} must be > 0, got {list(values)}")
        if any(v < 0 for v in self.ent_coefs):
            raise ValueError(f"ent_coefs must be ≥ 0, got {list(self.ent_coefs)}")


def rft_settings(cfg: Config) -> list[tuple[str, str, float, RFTConfig]]:
    """(setting, knob, value, RFT config): plain RFT first, then one knob at a time away from it. Values equal
    to the plain setting (lr ×1, its temperature, its entropy coefficient) are plain RFT and not repeated."""
    import dataclasses

    base = cfg.rft
    out = [("rft", "none", float("nan"), base)]
    for scale in cfg.lr_scales:
        if scale != 1:
            out.append((f"lr_x{scale:g}", "lr", scale, dataclasses.replace(base, lr=base.lr * scale)))
    for tau in cfg.temperatures:
        if tau != base.temperature:
            out.append((f"temperature_{tau:g}", "temperature", tau, dataclasses.replace(base, temperature=tau)))
    for coef in cfg.ent_coefs:
        if coef != base.ent_coef:
            out.append((f"ent_coef_{coef:g}", "ent_coef", coef, dataclasses.replace(base, ent_coef=coef)))
    return out


def run(cfg: Config, run) -> None:
    import pandas as pd
    import torch

    from rftlab import runtime

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    tasks = {name: load_task(cfg, name) for name in cfg.tasks.names}
    tokenizer, base = pretrained_model(cfg, tasks, run)
    state = run.load_checkpoint() or {"done": []}  # finished (task, stage) units; their tables are in parts/
    (run.path / "parts").mkdir(exist_ok=True)
    variants = {name: rft for name, _, _, rft in rft_settings(cfg)}
    stages_steps = {"pretrained": 0, **{name: rft.steps for name, rft in variants.items()}, "sft": cfg.sft.steps,
                    "sft_rft": cfg.rft.steps}
    with run.progress(len(cfg.sweep) * (len(stages_steps) + sum(stages_steps.values())), "remedies") as bar:
        for name in cfg.sweep:
            stages = TaskStages(cfg, run, tokenizer, base, name, tasks[name], bar)
            sft_path = run.path / "checkpoints" / f"{name}-sft.pt"
            for stage, steps in stages_steps.items():
                if f"{name}/{stage}" in state["done"]:
                    bar.advance(1 + steps)
                    continue
                runtime.seed_everything(cfg.seed)
                if stage == "pretrained":
                    model = stages.fresh()
                elif stage == "sft":
                    model = stages.sft(stages.fresh())
                    torch.save(model.state_dict(), sft_path)  # the start of SFT→RFT, kept for --resume
                elif stage == "sft_rft":
                    model = stages.rft(stages.fresh(torch.load(sft_path, weights_only=True)), stage)
                else:
                    model = stages.rft(stages.fresh(), stage, rft=variants[stage])
                table = stages.measure(model, stage)
                run.write_table(f"parts/{name}-{stage}", table)
                state["done"].append(f"{name}/{stage}")
                run.save_checkpoint(state)
                run.info(f"{name}/{stage}: mean reward {table.reward_mean.mean():.3f}, "
                         f"share with std < {SMALL_STD}: {(table.reward_std < SMALL_STD).mean():.2f}")
    inputs = pd.concat([pd.read_parquet(run.path / "parts" / f"{t}-{s}.parquet") for t in cfg.sweep
                        for s in stages_steps], ignore_index=True)
    run.write_table("inputs", inputs)
    table = summarize(inputs, cfg)
    run.write_table("settings", table)
    for task, part in table.groupby("task", sort=False):
        closed = ", ".join(f"{s} {g:+.2f}" for s, g in zip(part.setting, part.gap_closed, strict=True)
                           if s not in ("rft", "sft_rft"))
        run.info(f"{task}: RFT {part.reward.iloc[0]:.3f}, SFT→RFT {part.reward.iloc[-1]:.3f}; gap closed: {closed}")


def summarize(inputs, cfg: Config):
    """Table 2: one row per (task, setting) with the mean train reward after it, the share of the RFT → SFT→RFT
    gap it closes, the share of small-std inputs before (pretrained) and after, and the mean gain of the
    inputs whose initial std was small."""
    import pandas as pd

    rows = []
    settings = [(s, knob, value) for s, knob, value, _ in rft_settings(cfg)] + [("sft_rft", "sft", float("nan"))]
    for task, part in inputs.groupby("task", sort=False):
        wide = part.pivot(index="input_id", columns="stage", values="reward_mean")
        std = part.pivot(index="input_id", columns="stage", values="reward_std")
        small0 = std["pretrained"] < SMALL_STD
        for setting, knob, value in settings:
            rows.append({"task": task, "setting": setting, "knob": knob, "value": value, "seed": cfg.seed,
                         "reward": wide[setting].mean(), "frac_small_std_before": small0.mean(),
                         "frac_small_std_after": (std[setting] < SMALL_STD).mean(),
                         "gain_small_std": (wide[setting] - wide["pretrained"])[small0].mean()})
    table = pd.DataFrame(rows)
    reward = table.pivot(index="task", columns="setting", values="reward")
    rft, full = table.task.map(reward["rft"]), table.task.map(reward["sft_rft"])
    table["gap_closed"] = (table.reward - rft) / (full - rft).where((full - rft).abs() > 1e-9)  # NaN: no gap
    return table


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Table 2 as a figure (train reward per task × setting, cells coloured by the share of the gap closed,
    SFT→RFT as the reference row) and the share of small-std inputs before and after each setting."""
    import pandas as pd

    from rftlab.results import read_table

    table = pd.concat([read_table(r, "settings") for r in runs], ignore_index=True)
    mean = table.groupby(["task", "setting"], sort=False)[
        ["reward", "gap_closed", "frac_small_std_before", "frac_small_std_after"]].agg(["mean", "std"])
    return [_plot_table(table, mean, out_dir, fmt), _plot_small_std(table, mean, out_dir, fmt)]


def _label(setting: str, knob: str, value: float) -> str:
    if setting == "rft":
        return "RFT (lr ×1, τ = 1, entropy 0)"
    if setting == "sft_rft":
        return "SFT → RFT (reference)"
    return KNOB_LABELS[knob].format(value)


def _plot_table(table, mean, out_dir: Path, fmt: str) -> Path:
    import numpy as np

    from rftlab import plotting

    tasks = list(dict.fromkeys(table.task))
    settings = table.drop_duplicates("setting")[["setting", "knob", "value"]].to_numpy().tolist()
    gap = np.array([[mean.loc[(t, s), ("gap_closed", "mean")] for t in tasks] for s, _, _ in settings])
    fig, axes = plotting.figure(width=1.9 * len(tasks) + 2.4, height=0.42 * len(settings) + 1.3)
    ax = axes[0][0]
    ax.imshow(np.clip(gap, -0.25, 1.0), cmap="RdYlGn", vmin=-0.5, vmax=1.0, aspect="auto")
    n_seeds = table.groupby(["task", "setting"]).seed.nunique().max()
    for i, (s, _, _) in enumerate(settings):
        for j, t in enumerate(tasks):
            reward, sd = mean.loc[(t, s), ("reward", "mean")], mean.loc[(t, s), ("reward", "std")]
            text = f"{reward:.3f}" + (f" ± {sd:.3f}" if n_seeds > 1 else "")
            if s not in ("rft", "sft_rft"):
                text += f"\ngap closed {gap[i, j]:+.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    fontweight="bold" if s in ("rft", "sft_rft") else "normal")
    ax.axhline(len(settings) - 1.5, color="k", lw=1.2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(settings)), [_label(*row) for row in settings])
    ax.xaxis.tick_top()
    ax.grid(False)
    ax.set_title("Train reward after each setting (colour: share of the RFT → SFT→RFT gap closed)"
                 + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ""), pad=22)
    return plotting.save(fig, out_dir, "remedies_table2", fmt)


def _plot_small_std(table, mean, out_dir: Path, fmt: str) -> Path:
    import numpy as np

    from rftlab import plotting

    tasks = list(dict.fromkeys(table.task))
    settings = table.drop_duplicates("setting")[["setting", "knob", "value"]].to_numpy().tolist()
    fig, axes = plotting.figure(ncols=len(tasks), width=3.6, height=3.4, sharey=True)
    y = np.arange(len(settings))
    for ax, task in zip(axes[0], tasks, strict=True):
        after = [mean.loc[(task, s), ("frac_small_std_after", "mean")] for s, _, _ in settings]
        before = mean.loc[(task, settings[0][0]), ("frac_small_std_before", "mean")]
        colors = [plotting.COLORS["sft"] if s == "sft_rft" else plotting.COLORS["rft"] for s, _, _ in settings]
        ax.barh(y, after, color=colors, alpha=0.8)
        ax.axvline(before, color="k", ls="--", lw=1, label=f"pretrained: {before:.2f}")
        ax.set(title=task, xlabel=f"share of inputs with reward std < {SMALL_STD}", xlim=(0, 1.02))
        ax.legend(loc="lower right", framealpha=0.9)
    axes[0][0].set_yticks(y, [_label(*row) for row in settings])
    axes[0][0].invert_yaxis()  # shared y: once, so plain RFT is on top and SFT→RFT at the bottom, as the table
    fig.suptitle("Small-std inputs before (dashed) and after each setting")
    return plotting.save(fig, out_dir, "remedies_small_std", fmt)
