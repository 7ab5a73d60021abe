"""A small initial SFT phase rescues RFT: Razin et al. (ICLR 2024), §5.2 and Fig. 4. SFT on a random fraction of
the labelled inputs for a fraction of the full SFT steps, then the same RFT; the paper reports that 1% of the
inputs with 40% of the steps reaches 96% of the reward of RFT after full SFT.

Stages, per swept task, all from one cached pretrained model (grue's: the same task, model and pretraining
settings hit the same cache): per-input statistics of the pretrained model; plain RFT (no SFT) for reference;
then for every (fraction, steps fraction) of the grid: SFT on ``round(fraction · n_train)`` train inputs (nested
random subsets: a smaller fraction's inputs are among a larger one's) for ``round(steps_fraction · sft.steps)``
steps, the statistics, RFT (PPO as in grue), the statistics again. ``grid.parquet`` holds the Fig. 4 quantity:
the train reward after SFT→RFT relative to that after full SFT (100% of the inputs, 100% of the steps)→RFT.
The per-input statistics after each SFT setting show SFT raising the reward std of inputs RFT cannot move.

At the default preset's scale 1% of the 400 labelled inputs is 4 inputs (the paper's 1% is hundreds): SFT on
them fits those 4 and leaves most inputs at small std, and RFT after it ends below RFT without SFT.

CPU runtime of the default preset: about 19 min (two tasks, 3 × 3 grid and RFT alone, one core).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rftlab.grue_stages import SMALL_STD, PretrainConfig, TasksConfig, TaskStages, load_task, pretrained_model
from rftlab.grue_stages import check_inputs as check  # noqa: F401 (the registry calls it before a run folder exists)
from rftlab.lm_config import LMConfig
from rftlab.registry import experiment
from rftlab.rl.settings import RFTConfig, SamplingConfig, SFTConfig

TRAINING_OPTIONS = True  # trains under `rftlab run --precision` and `--compile` (bf16 autocast, torch.compile)

METRICS = {
    "task, stage, step, fraction, steps_fraction": "task; stage (rft, sft, sft_rft); step; the SFT setting "
    "(share of labelled inputs, share of sft.steps; 0, 0 = no SFT)",
    "loss/sft, reward/mean, kl, entropy, …": "SFT and PPO statistics per step, as in grue",
    "inputs.parquet": "per (task, stage, fraction, steps_fraction, input_id): reward_mean, reward_std, rewards (K)",
    "grid.parquet": "Fig. 4, per (task, fraction, steps_fraction, seed): n_labelled, sft_steps, reward (mean train "
    "reward after SFT→RFT), relative_to_full = reward / reward of full SFT→RFT, sft_reward (after the SFT phase), "
    "frac_small_std_sft / _final (reward std < 0.05 after SFT / after RFT); (0, 0) = RFT without SFT",
}


@experiment(name="sft-fraction", paper="Razin et al. 2024", figure="§5.2 Fig. 4", version=1, cpu_runtime="~19 min")
@dataclass(frozen=True)
class Config:
    tasks: TasksConfig = field(default_factory=TasksConfig)  # all of them pretrain the shared model
    sweep: tuple[str, ...] = ("iwslt", "totto")  # tasks the grid runs on (⊆ tasks.names)
    model: LMConfig = field(default_factory=lambda: LMConfig(n_layer=2, n_embd=128, n_head=4, n_positions=160))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    stats: SamplingConfig = field(default_factory=SamplingConfig)
    rft: RFTConfig = field(default_factory=RFTConfig)  # the RFT after every SFT setting
    sft: SFTConfig = field(default_factory=SFTConfig)  # full SFT: sft.steps is 100% of the steps
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1.0)  # share of the labelled train inputs SFT sees
    steps_fractions: tuple[float, ...] = (0.1, 0.2, 0.4, 1.0)  # share of sft.steps
    rft_baseline: bool = True  # also RFT from the pretrained model (no SFT), as the (0, 0) row
    seed: int = 0  # seeds pretraining, sampling, the labelled subsets and finetuning
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        missing = [t for t in self.sweep if t not in self.tasks.names]
        if missing or not self.sweep:
            raise ValueError(f"sweep {list(self.sweep)} must name tasks of tasks.names {list(self.tasks.names)}")
        for name in ("fractions", "steps_fractions"):
            values = getattr(self, name)
            if any(not 0 < v <= 1 for v in values) or 1.0 not in values:
                raise ValueError(f"{name} must lie in (0, 1] and contain 1 (the full SFT→RFT reference), "
                                 f"got {list(values)}")


def grid(cfg: Config) -> list[tuple[float, float]]:
    """The (fraction, steps_fraction) units in run order; (0, 0) is RFT without SFT."""
    units = [(f, s) for f in sorted(cfg.fractions) for s in sorted(cfg.steps_fractions)]
    return ([(0.0, 0.0)] if cfg.rft_baseline else []) + units


def labelled_subset(examples: list, fraction: float, seed: int) -> list:
    """``round(fraction · len(examples))`` inputs (at least one), the first of one seeded permutation, so the
    subsets of smaller fractions are nested in those of larger ones."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[: max(1, round(fraction * len(examples)))]]


def sft_steps(cfg: Config, steps_fraction: float) -> int:
    return max(1, round(steps_fraction * cfg.sft.steps))


def run(cfg: Config, run) -> None:
    import pandas as pd
    import torch

    from rftlab import runtime

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    tasks = {name: load_task(cfg, name) for name in cfg.tasks.names}
    tokenizer, base = pretrained_model(cfg, tasks, run)
    state = run.load_checkpoint() or {"done": []}  # finished units (task/stage/setting); tables in parts/
    (run.path / "parts").mkdir(exist_ok=True)
    units = grid(cfg)
    total = len(cfg.sweep) * (1 + sum(2 + cfg.rft.steps + (sft_steps(cfg, s) + 1 if f else -1) for f, s in units))
    parts = []
    with run.progress(total, "sft-fraction") as bar:
        for name in cfg.sweep:
            stages = TaskStages(cfg, run, tokenizer, base, name, tasks[name], bar)
            plan = [("pretrained", 0.0, 0.0)] + [(st, f, s) for f, s in units for st in (("sft", "sft_rft") if f
                                                                                        else ("rft",))]
            for stage, fraction, steps_fraction in plan:
                key = f"{name}/{stage}/{fraction:g}/{steps_fraction:g}"
                part = f"parts/{key.replace('/', '-')}"
                parts.append(part)
                n_steps = {"pretrained": 0, "rft": cfg.rft.steps, "sft_rft": cfg.rft.steps,
                           "sft": sft_steps(cfg, steps_fraction)}[stage]
                if key in state["done"]:
                    bar.advance(1 + n_steps)
                    continue
                runtime.seed_everything(cfg.seed)
                subset = labelled_subset(stages.train_examples, fraction, cfg.seed) if fraction else []
                setting = {"fraction": fraction, "steps_fraction": steps_fraction}
                sft_path = run.path / "checkpoints" / f"{name}-sft-{fraction:g}-{steps_fraction:g}.pt"
                if stage == "pretrained":
                    model = stages.fresh()
                elif stage == "rft":
                    model = stages.rft(stages.fresh(), stage, log=setting)
                elif stage == "sft":
                    model = stages.sft(stages.fresh(), steps=n_steps, examples=subset, log=setting)
                    torch.save(model.state_dict(), sft_path)  # the start of this setting's RFT, kept for --resume
                else:
                    model = stages.rft(stages.fresh(torch.load(sft_path, weights_only=True)), stage, log=setting)
                table = stages.measure(model, stage).assign(**setting, n_labelled=len(subset),
                                                            sft_steps=sft_steps(cfg, steps_fraction) if fraction else 0)
                run.write_table(part, table)
                state["done"].append(key)
                run.save_checkpoint(state)
                run.info(f"{key}: mean reward {table.reward_mean.mean():.3f}, "
                         f"share with std < {SMALL_STD}: {(table.reward_std < SMALL_STD).mean():.2f}")
    inputs = pd.concat([pd.read_parquet(run.path / f"{p}.parquet") for p in parts], ignore_index=True)
    run.write_table("inputs", inputs)
    table = summarize(inputs, cfg)
    run.write_table("grid", table)
    for task, part in table.groupby("task", sort=False):
        cells = ", ".join(f"({f:g}, {s:g}) {r:.2f}" for f, s, r in zip(part.fraction, part.steps_fraction,
                                                                         part.relative_to_full, strict=True))
        run.info(f"{task}: reward relative to full SFT→RFT: {cells}")


def summarize(inputs, cfg: Config):
    """Fig. 4: per (task, fraction, steps_fraction) the mean train reward after the final RFT, relative to full
    SFT→RFT, with the reward and small-std share after the SFT phase."""
    import pandas as pd

    rows = []
    final = inputs[inputs.stage.isin(["rft", "sft_rft"])]
    for (task, fraction, steps_fraction), part in final.groupby(["task", "fraction", "steps_fraction"], sort=False):
        sft = inputs[(inputs.task == task) & (inputs.stage == "sft") & (inputs.fraction == fraction)
                     & (inputs.steps_fraction == steps_fraction)]
        rows.append({"task": task, "fraction": fraction, "steps_fraction": steps_fraction, "seed": cfg.seed,
                     "n_labelled": part.n_labelled.iloc[0], "sft_steps": part.sft_steps.iloc[0],
                     "reward": part.reward_mean.mean(), "sft_reward": sft.reward_mean.mean(),
                     "frac_small_std_sft": (sft.reward_std < SMALL_STD).mean() if len(sft) else float("nan"),
                     "frac_small_std_final": (part.reward_std < SMALL_STD).mean()})
    table = pd.DataFrame(rows)
    full = table[(table.fraction == 1) & (table.steps_fraction == 1)].set_index("task").reward
    table["relative_to_full"] = table.reward / table.task.map(full)
    return table


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Fig. 4 (heatmap over fraction × steps of the reward relative to full SFT→RFT, per task) and the reward
    std after each SFT setting of the inputs whose pretrained std was small."""
    import pandas as pd

    from rftlab.results import read_table

    table = pd.concat([read_table(r, "grid") for r in runs], ignore_index=True)
    inputs = pd.concat([read_table(r, "inputs").assign(run=i) for i, r in enumerate(runs)], ignore_index=True)
    return [_plot_heatmap(table, out_dir, fmt), _plot_std(inputs, out_dir, fmt)]


def _plot_heatmap(table, out_dir: Path, fmt: str) -> Path:
    from rftlab import plotting

    tasks = list(dict.fromkeys(table.task))
    fig, axes = plotting.figure(ncols=len(tasks), width=3.6, height=3.2)
    n_seeds = table.groupby(["task", "fraction", "steps_fraction"]).seed.nunique().max()
    for ax, task in zip(axes[0], tasks, strict=True):
        part = table[table.task == task]
        cells = part[part.fraction > 0].pivot_table(index="fraction", columns="steps_fraction",
                                                    values="relative_to_full", aggfunc="mean")
        image = ax.imshow(cells.to_numpy(), cmap="viridis", vmin=0, vmax=1.1, origin="lower", aspect="auto")
        for i, fraction in enumerate(cells.index):
            for j, steps in enumerate(cells.columns):
                value = cells.loc[fraction, steps]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(cells.columns)), [f"{s:.0%}" for s in cells.columns])
        ax.set_yticks(range(len(cells.index)), [f"{f:.0%}" for f in cells.index])
        ax.set(xlabel="SFT steps (share of full SFT)", ylabel="labelled inputs used by SFT")
        ax.grid(False)
        baseline = part[part.fraction == 0].relative_to_full.mean()
        full = part[(part.fraction == 1) & (part.steps_fraction == 1)].reward.mean()
        ax.set_title(f"{task}: full SFT→RFT reward {full:.3f}"
                     + (f"\nRFT without SFT: {baseline:.2f} of it" if part.fraction.eq(0).any() else ""))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="reward after SFT→RFT / full SFT→RFT")
    fig.suptitle("Partial SFT, then RFT: train reward relative to full SFT→RFT"
                 + (f" (mean over {n_seeds} seeds)" if n_seeds > 1 else ""))
    return plotting.save(fig, out_dir, "sft_fraction_fig4", fmt)


def _plot_std(inputs, out_dir: Path, fmt: str) -> Path:
    from rftlab import plotting

    tasks = list(dict.fromkeys(inputs.task))
    fig, axes = plotting.figure(nrows=len(tasks), width=9.0, height=3.0)
    for ax, task in zip((row[0] for row in axes), tasks, strict=True):
        part = inputs[inputs.task == task]
        pre = part[part.stage == "pretrained"].set_index(["run", "input_id"]).reward_std
        small = pre.index[pre < SMALL_STD]  # inputs the pretrained model is confident on
        groups = [("pretrained", pre.loc[small])]
        rft = part[part.stage == "rft"].set_index(["run", "input_id"]).reward_std
        if len(rft):
            groups.append(("after RFT\n(no SFT)", rft.reindex(small)))
        sft = part[part.stage == "sft"]
        for (fraction, steps), group in sft.groupby(["fraction", "steps_fraction"]):
            groups.append((f"SFT {fraction:.0%}\n× {steps:.0%} steps",
                           group.set_index(["run", "input_id"]).reward_std.reindex(small)))
        ax.boxplot([g.dropna().to_numpy() for _, g in groups], showfliers=True, flierprops={"markersize": 2},
                   tick_labels=[f"{label}\n{(g < SMALL_STD).mean():.0%} < {SMALL_STD}" for label, g in groups])
        ax.axhline(SMALL_STD, color=plotting.COLORS["small_std"], ls=":", lw=1)
        ax.set(ylabel="reward std", title=f"{task}: reward std of the {len(small)} inputs whose pretrained std was "
               f"< {SMALL_STD} (labels: share still below)")
        ax.tick_params(axis="x", labelsize=7)
    return plotting.save(fig, out_dir, "sft_fraction_std", fmt)
