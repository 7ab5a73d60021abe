"""GRUE-style benchmark of Razin et al. (ICLR 2024), §4.1, Fig. 1 and Table 1: per-input reward std under
the pretrained model predicts which inputs RFT can improve; SFT improves them regardless.

Stages, per task: a stand-in for GPT-2/T5 pretraining (one small GPT-2 pretrained on the pooled, topic-
shifted corpora of all tasks; cached by config hash) → per-input statistics (K samples per train input:
reward mean and std, plus a sampled estimate of ‖∇V(x)‖ on a subset) → RFT (PPO as RL4LMs runs it, or
REINFORCE), SFT on the references, and SFT→RFT, each from the pretrained model → the same statistics.
The claim: many inputs start with small reward std at low reward; RFT's per-input gain grows with the
initial std while SFT's does not, so RFT lags SFT most on the tasks with many small-std inputs.

The synthetic tasks (``rftlab.data.grue_tasks``) mirror IMDB, CommonGen, IWSLT2017, CNN/DailyMail,
NarrativeQA and ToTTo in prompt format and reward; the ``paper`` preset reads the real data sets from a
local folder (``rftlab.data.grue_real``) and loads the paper's models by name or path.

CPU runtime of the default preset: about 15 min (2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rftlab.grue_stages import SMALL_STD, PretrainConfig, TasksConfig, TaskStages, load_task, pretrained_model
from rftlab.grue_stages import check_inputs as check  # noqa: F401 (the registry calls it before a run folder exists)
from rftlab.lm_config import LMConfig
from rftlab.registry import experiment
from rftlab.rl.settings import RFTConfig, SamplingConfig, SFTConfig

STAGES = ("pretrained", "rft", "sft", "sft_rft")

TRAINING_OPTIONS = True  # trains under `rftlab run --precision` and `--compile` (bf16 autocast, torch.compile)

METRICS = {
    "task, stage, step": "task name; training stage (rft, sft, sft_rft); optimizer step within the stage",
    "reward/mean, reward/std": "rollout reward mean and mean within-input std (TRL names)",
    "frac_reward_zero_std": "share of rollout inputs whose K rewards are all equal",
    "kl, beta, entropy": "PPO: mean per-token log π − log π_ref, KL coefficient, token entropy",
    "policy/clipfrac, policy/approxkl, loss/policy, loss/value": "PPO statistics (RL4LMs definitions)",
    "loss/sft": "SFT cross-entropy per response token",
    "inputs.parquet": "per (task, stage, input_id): reward_mean, reward_std, rewards (K), samples, topic "
    "frequency, grad_norm (sampled ‖∇V(x)‖ estimate on a subset, pretrained stage) and grad_reward_std (the "
    "reward std of the samples behind it)",
    "summary.parquet": "per task: std_p10, frac_small_std, frac_small_std_low_reward, gains of rft / sft / "
    "sft_rft, Pearson and Spearman of initial std vs gain for rft and sft",
}


@experiment(name="grue", paper="Razin et al. 2024", figure="§4.1 Fig. 1, Table 1", version=1,
            cpu_runtime="~15 min")
@dataclass(frozen=True)
class Config:
    tasks: TasksConfig = field(default_factory=TasksConfig)
    model: LMConfig = field(default_factory=lambda: LMConfig(n_layer=2, n_embd=128, n_head=4, n_positions=160))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    stats: SamplingConfig = field(default_factory=SamplingConfig)
    rft: RFTConfig = field(default_factory=RFTConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    seed: int = 0  # seeds pretraining, sampling and finetuning
    threads: int = 0  # torch intra-op threads (0 = torch's default)


def check_processes(cfg: Config, n: int) -> None:
    """Runs on n processes when every batch splits evenly (see ``rftlab.grue_stages``)."""
    from rftlab.distributed import require_multiples

    require_multiples(n, {"rft.batch_prompts": cfg.rft.batch_prompts, "rft.minibatch_size": cfg.rft.minibatch_size,
                          "sft.batch_size": cfg.sft.batch_size})


def run(cfg: Config, run) -> None:
    import pandas as pd
    import torch

    from rftlab import distributed as dist
    from rftlab import runtime

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    tasks = {name: load_task(cfg, name) for name in cfg.tasks.names}
    dist.import_now(f"transformers.models.{cfg.model.arch}.modeling_{cfg.model.arch}")
    with dist.main_process_first():  # the main process pretrains and caches; the others load the cache
        tokenizer, base = pretrained_model(cfg, tasks, run)
    state = run.load_checkpoint() or {"done": []}  # finished (task, stage) pairs; their tables are in parts/
    (run.path / "parts").mkdir(exist_ok=True)
    steps = {"pretrained": 0, "rft": cfg.rft.steps, "sft": cfg.sft.steps, "sft_rft": cfg.rft.steps}
    with run.progress(len(tasks) * (len(STAGES) + sum(steps.values())), "grue") as bar:
        for name, task in tasks.items():
            stages = TaskStages(cfg, run, tokenizer, base, name, task, bar)
            sft_path = run.path / "checkpoints" / f"{name}-sft.pt"
            for stage in STAGES:
                if f"{name}/{stage}" in state["done"]:
                    bar.advance(1 + steps[stage])
                    continue
                runtime.seed_everything(cfg.seed)
                if stage == "pretrained":
                    model = stages.fresh()
                elif stage == "rft":
                    model = stages.rft(stages.fresh(), stage)
                elif stage == "sft":
                    model = stages.sft(stages.fresh())
                    if run.is_main:
                        torch.save(model.state_dict(), sft_path)  # the start of SFT→RFT, kept for --resume
                    dist.barrier()  # ... and read by every process
                else:
                    model = stages.rft(stages.fresh(torch.load(sft_path, weights_only=True)), stage)
                table = stages.measure(model, stage)
                run.write_table(f"parts/{name}-{stage}", table)
                state["done"].append(f"{name}/{stage}")
                run.save_checkpoint(state)
                run.info(f"{name}/{stage}: mean reward {table.reward_mean.mean():.3f}, "
                         f"share with std < {SMALL_STD}: {(table.reward_std < SMALL_STD).mean():.2f}")
    if not run.is_main:  # the main process assembles the tables from the parts it wrote
        return
    inputs = pd.concat([pd.read_parquet(run.path / "parts" / f"{t}-{s}.parquet") for t in tasks for s in STAGES],
                       ignore_index=True)
    run.write_table("inputs", inputs)
    run.write_table("summary", summarize(inputs))


def summarize(inputs):
    """Table 1 per task: initial std percentiles and small-std shares, mean gains per stage, and the
    per-input correlations between the initial std and the gain of RFT and of SFT."""
    import pandas as pd
    from scipy import stats as st

    rows = []
    for task, part in inputs.groupby("task", sort=False):
        wide = part.pivot(index="input_id", columns="stage", values="reward_mean")
        std0 = part[part.stage == "pretrained"].set_index("input_id").reward_std
        best = part.best_reward.iloc[0]
        row = {"task": task, "best_reward": best, "std_p10": std0.quantile(0.1), "std_median": std0.median(),
               "frac_small_std": (std0 < SMALL_STD).mean(),
               "frac_small_std_low_reward": ((std0 < SMALL_STD) & (wide.pretrained < best / 2)).mean(),
               "reward_pretrained": wide.pretrained.mean()}
        for stage in STAGES[1:]:
            gain = wide[stage] - wide.pretrained
            row[f"reward_{stage}"] = wide[stage].mean()
            row[f"gain_{stage}"] = gain.mean()
            row[f"gain_{stage}_small_std"] = gain[std0 < SMALL_STD].mean()
            if stage in ("rft", "sft"):
                row[f"pearson_{stage}"] = st.pearsonr(std0, gain).statistic if gain.std() > 0 else float("nan")
                row[f"spearman_{stage}"] = st.spearmanr(std0, gain).statistic if gain.std() > 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Fig. 1 (reward mean vs std per input and stage), gain vs initial std with correlations, Table 1 as a
    figure, and the sampled gradient norm vs std."""
    import pandas as pd

    from rftlab.results import read_table

    inputs = pd.concat([read_table(r, "inputs").assign(run=i) for i, r in enumerate(runs)], ignore_index=True)
    inputs["input_id"] = inputs["run"].astype(str) + ":" + inputs["input_id"].astype(str)  # seeds pooled
    summary = summarize(inputs)
    return [_plot_scatter(inputs, out_dir, fmt), _plot_gain(inputs, out_dir, fmt),
            _plot_table(summary, out_dir, fmt), _plot_grad(inputs, out_dir, fmt)]


def _plot_scatter(inputs, out_dir: Path, fmt: str) -> Path:
    from rftlab import plotting

    tasks = list(dict.fromkeys(inputs.task))
    stages = [s for s in STAGES if s in set(inputs.stage)]
    fig, axes = plotting.figure(ncols=len(stages), nrows=len(tasks), width=2.3, height=2.0, sharex=True,
                                sharey="row")
    colors = {"seen": "#2ca02c", "rare": "#ff7f0e", "unseen": "#9467bd", "": "#555555"}
    titles = {"pretrained": "pretrained", "rft": "after RFT", "sft": "after SFT", "sft_rft": "after SFT→RFT"}
    for r, task in enumerate(tasks):
        for c, stage in enumerate(stages):
            ax = axes[r][c]
            part = inputs[(inputs.task == task) & (inputs.stage == stage)]
            for freq in ("seen", "rare", "unseen", ""):
                group = part[part.topic_frequency == freq]
                if group.empty:
                    continue
                ax.scatter(group.reward_std, group.reward_mean, s=6, alpha=0.6, color=colors[freq],
                           label=f"{freq or 'all'} topics", linewidths=0)
            ax.axvline(SMALL_STD, color="k", lw=0.6, ls=":")
            ax.set_xlim(-0.01, max(0.2, inputs.reward_std.max() * 1.05))
            ax.set_ylim(-0.03, max(part.best_reward.max(), inputs.reward_mean.max()) * 1.05)
            if r == 0:
                ax.set_title(titles[stage])
            if c == 0:
                ax.set_ylabel(f"{task}\nreward mean")
            if r == len(tasks) - 1:
                ax.set_xlabel("reward std")
    axes[0][0].legend(loc="upper left", markerscale=2)
    fig.suptitle("Per-input reward mean vs std (each point one train input, K samples)")
    return plotting.save(fig, out_dir, "grue_fig1_mean_vs_std", fmt)


def _plot_gain(inputs, out_dir: Path, fmt: str) -> Path:
    from scipy import stats as st

    from rftlab import plotting

    tasks = list(dict.fromkeys(inputs.task))
    ncols = min(4, len(tasks) + 1)
    nrows = -(-(len(tasks) + 1) // ncols)
    fig, axes = plotting.figure(ncols=ncols, nrows=nrows, width=3.0, height=2.7, sharey=True)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(tasks) + 1:]:
        ax.set_visible(False)
    for ax, task in zip(flat, [*tasks, "all tasks"], strict=False):
        part = inputs if task == "all tasks" else inputs[inputs.task == task]
        wide = part.pivot_table(index=["task", "input_id"], columns="stage", values="reward_mean")
        std0 = part[part.stage == "pretrained"].set_index(["task", "input_id"]).reward_std.reindex(wide.index)
        for method in ("rft", "sft"):
            gain = wide[method] - wide.pretrained
            r = st.pearsonr(std0, gain).statistic if gain.std() > 0 else float("nan")
            rho = st.spearmanr(std0, gain).statistic if gain.std() > 0 else float("nan")
            ax.scatter(std0, gain, s=5, alpha=0.45, color=plotting.COLORS[method], linewidths=0,
                       label=f"{method.upper()}: r={r:.2f}, ρ={rho:.2f}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set(title=task, xlabel="initial reward std")
        ax.legend(loc="upper left", fontsize=7, markerscale=2)
    for row in axes:
        row[0].set_ylabel("reward gain (after − pretrained)")
    fig.suptitle("Per-input reward gain vs initial reward std (Pearson r, Spearman ρ)")
    return plotting.save(fig, out_dir, "grue_gain_vs_std", fmt)


def _plot_table(summary, out_dir: Path, fmt: str) -> Path:
    import numpy as np

    from rftlab import plotting

    fig, axes = plotting.figure(ncols=2, width=4.6, height=3.0)
    left, right = axes[0]
    x = np.arange(len(summary))
    left.bar(x - 0.2, summary.frac_small_std, 0.4, label=f"std < {SMALL_STD}", color="#7f7f7f")
    left.bar(x + 0.2, summary.frac_small_std_low_reward, 0.4, label="… and mean < best/2", color="#d62728")
    left.set(xticks=x, title="Share of inputs with small initial std", ylabel="share of inputs")
    left.set_xticklabels(summary.task, rotation=30, ha="right")
    left.legend()
    for offset, stage, color in ((-0.27, "rft", plotting.COLORS["rft"]), (0, "sft", plotting.COLORS["sft"]),
                                 (0.27, "sft_rft", "#9467bd")):
        right.bar(x + offset, summary[f"gain_{stage}"], 0.27, color=color,
                  label={"rft": "RFT", "sft": "SFT", "sft_rft": "SFT→RFT"}[stage])
    right.axhline(0, color="k", lw=0.6)
    right.set(xticks=x, title="Mean train reward gain over the pretrained model", ylabel="reward gain")
    right.set_xticklabels(summary.task, rotation=30, ha="right")
    right.legend()
    return plotting.save(fig, out_dir, "grue_table1", fmt)


def _plot_grad(inputs, out_dir: Path, fmt: str) -> Path:
    import numpy as np

    from rftlab import plotting

    part = inputs[(inputs.stage == "pretrained")]
    part = part[part.get("grad_norm", np.nan * part.reward_std).notna()] if "grad_norm" in part else part.iloc[:0]
    fig, axes = plotting.figure(width=4.4, height=3.4)
    ax = axes[0][0]
    floor_std, floor_grad = 1e-3, 1e-4
    for task, group in part.groupby("task", sort=False):
        ax.scatter(group.grad_reward_std.clip(lower=floor_std), group.grad_norm.clip(lower=floor_grad), s=10,
                   alpha=0.7, label=task, linewidths=0)
    ax.set(xscale="log", yscale="log", xlabel=f"reward std of the K samples (< {floor_std:g} shown at {floor_std:g})",
           ylabel=f"sampled ‖∇θ V(x)‖ (0 shown at {floor_grad:g})",
           title="Gradient-norm estimate vs reward std (pretrained)")
    ax.legend(fontsize=7)
    return plotting.save(fig, out_dir, "grue_grad_vs_std", fmt)
