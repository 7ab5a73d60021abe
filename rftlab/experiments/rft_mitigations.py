"""Mitigations of vanishing gradients in RFT beyond Razin et al. (ICLR 2024, §5), compared at an equal budget.

Practitioners meet the paper's vanishing gradient as zero-variance prompt groups in GRPO: an input whose K
sampled rewards are all equal gets zero advantage and adds nothing to the update (TRL logs their share as
``frac_reward_zero_std``). Three fixes from practice and one from the paper, each an option of the same
group-baseline REINFORCE loop (K samples per input, group-mean baseline), on the GRUE-style tasks with the
largest share of small-std inputs under the pretrained model:

* ``grpo``: advantages divided by the group std (GRPO); ``dr_grpo``: without that scaling (Dr. GRPO, Liu et
  al. 2025, who argue 1/std over-weights near-constant groups);
* ``grpo_filter``: DAPO's dynamic sampling (Yu et al. 2025): drop inputs whose K rewards are all equal and
  draw fresh prompts to refill the batch;
* ``sft_random_grpo``: SFT on a random 1% of the train inputs, then GRPO (the paper's §5.2 remedy);
* ``sft_low_std_grpo`` (and ``… _filter``): the same 1% label budget spent on the inputs with the lowest
  reward std under the pretrained model (ties: lowest mean reward first), then GRPO (with the filter).

Equal budget: every RFT phase stops after ``rft.steps · rft.batch_prompts · rft.k`` sampled completions, the
filter's resampling included (so it takes fewer optimizer steps); the SFT methods use the same number of
labelled inputs. The low-std selection also reads the initial per-input statistics, which every method
measures anyway (``selection_samples`` counts them). Reported per (task, method, seed): final train reward and
that of the inputs with initial std < SMALL_STD, on the ``n_stats`` measured inputs, and the mean share of
zero-std groups per rollout over training.

The pretrained model is ``grue``'s (same tasks, model and pretraining settings share its cache); the labelled
inputs of both SFT methods are drawn from the measured inputs, on which rewards are reported.

CPU runtime of the default preset: about 19 min on one core (threads=1), pretraining included (about 17 min
with grue's pretrained model already cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from rftlab.grue_stages import SMALL_STD, PretrainConfig, TasksConfig, TaskStages, load_task, pretrained_model
from rftlab.grue_stages import check_inputs as check  # noqa: F401 (the registry calls it before a run folder exists)
from rftlab.lm_config import LMConfig
from rftlab.registry import experiment
from rftlab.rl.settings import RFTConfig, SamplingConfig, SFTConfig

# method → (labelled subset for SFT before RFT: None, "random" or "low_std"; divide by the group std; filter)
METHODS = {
    "grpo": (None, True, False),
    "dr_grpo": (None, False, False),
    "grpo_filter": (None, True, True),
    "sft_random_grpo": ("random", True, False),
    "sft_low_std_grpo": ("low_std", True, False),
    "sft_low_std_grpo_filter": ("low_std", True, True),
}
LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO (no std)", "grpo_filter": "GRPO + 0-var filter",
          "sft_random_grpo": "random 1% SFT → GRPO", "sft_low_std_grpo": "low-std 1% SFT → GRPO",
          "sft_low_std_grpo_filter": "low-std 1% SFT → GRPO + filter"}

TRAINING_OPTIONS = True  # trains under `rftlab run --precision` and `--compile` (bf16 autocast, torch.compile)

METRICS = {
    "seed, task, stage, step": "seed; task; method (or sft); optimizer step within the stage",
    "reward/mean, reward/std, frac_reward_zero_std": "rollout reward mean, mean within-input std and share of "
    "inputs whose K rewards are all equal (TRL names; with the filter, over every input sampled in the step)",
    "samples, samples_used": "completions sampled in the step; cumulative within the RFT phase (the budget)",
    "filter/rounds, filter/kept_prompts": "rollout rounds of the step; inputs left in the update",
    "loss/policy, grad_norm, loss/sft": "REINFORCE surrogate, pre-clip gradient norm, SFT cross-entropy",
    "methods.parquet": "per (task, method, seed): reward, reward_small_std (inputs with initial std < "
    "SMALL_STD), reward_initial, reward_small_std_initial, frac_zero_std_mean (over RFT steps), samples_used, "
    "labels_used, selection_samples, rft_steps",
    "inputs.parquet": "per (seed, task, stage, input_id): reward_mean, reward_std, rewards (K), initial std",
    "labelled.parquet": "per (seed, task, selection): the labelled input_ids with their initial mean and std",
}


@experiment(name="rft-mitigations", paper="Razin et al. 2024 + DAPO / Dr. GRPO", figure="beyond §5",
            version=1, cpu_runtime="~19 min")
@dataclass(frozen=True)
class Config:
    # pretraining pool and per-task sizes: grue's defaults, so the cached pretrained model is shared with it
    tasks: TasksConfig = field(default_factory=TasksConfig)
    finetune_tasks: tuple[str, ...] = ("iwslt", "totto")  # tasks compared (largest small-std shares in grue)
    methods: tuple[str, ...] = tuple(METHODS)  # subset of METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # finetuning seeds (sampling, prompt order, random subset)
    label_fraction: float = 0.01  # labelled share of the train inputs for the SFT methods (paper §5.2: 1%)
    model: LMConfig = field(default_factory=lambda: LMConfig(n_layer=2, n_embd=128, n_head=4, n_positions=160))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    stats: SamplingConfig = field(default_factory=SamplingConfig)  # per-input statistics (K = stats.k)
    # group-baseline REINFORCE; the budget is steps · batch_prompts · k sampled completions per RFT phase
    rft: RFTConfig = field(default_factory=lambda: RFTConfig(algorithm="reinforce", baseline="mean", steps=40,
                                                             lr=1e-4))
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=60, batch_size=8))  # on the labelled subset
    seed: int = 0  # seeds pretraining (shared by every finetuning seed)
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        if not set(self.finetune_tasks) <= set(self.tasks.names) or not self.finetune_tasks:
            raise ValueError(f"finetune_tasks must be among tasks.names {list(self.tasks.names)}")
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.rft.algorithm != "reinforce" or self.rft.baseline == "none":
            raise ValueError("rft must be group-baseline REINFORCE (rft.algorithm=reinforce, baseline mean or rloo)")
        if not 0 < self.label_fraction <= 1 or not self.seeds:
            raise ValueError("label_fraction must be in (0, 1] and seeds non-empty")


def run(cfg: Config, run) -> None:
    import pandas as pd

    from rftlab import runtime

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    tasks = {name: load_task(cfg, name) for name in cfg.tasks.names}
    tokenizer, base = pretrained_model(cfg, tasks, run)
    state = run.load_checkpoint() or {"done": []}  # finished "seed/task/unit"; their tables are in parts/
    (run.path / "parts").mkdir(exist_ok=True)
    n_sft = sum(METHODS[m][0] is not None for m in cfg.methods)
    per_pair = 1 + len(cfg.methods) * (cfg.rft.steps + 1) + n_sft * cfg.sft.steps
    with run.progress(len(cfg.seeds) * len(cfg.finetune_tasks) * per_pair, "rft-mitigations") as bar:
        for seed in cfg.seeds:
            for name in cfg.finetune_tasks:
                stages = TaskStages(replace(cfg, seed=seed), run, tokenizer, base, name, tasks[name], bar)
                key = f"{seed}-{name}"
                if f"{key}/initial" in state["done"]:
                    bar.advance()
                else:
                    runtime.seed_everything(seed)
                    _write_part(run, f"{key}-initial", stages.measure(stages.fresh(), "initial").assign(seed=seed))
                    _mark_done(run, state, f"{key}/initial")
                initial = pd.read_parquet(run.path / "parts" / f"{key}-initial.parquet")
                for method in cfg.methods:
                    if f"{key}/{method}" in state["done"]:
                        bar.advance(cfg.rft.steps + 1 + (cfg.sft.steps if METHODS[method][0] else 0))
                        continue
                    runtime.seed_everything(seed)
                    table, row = _run_method(cfg, run, stages, initial, method, seed, bar)
                    _write_part(run, f"{key}-{method}", table)
                    _write_part(run, f"{key}-{method}-row", pd.DataFrame([row]))
                    _mark_done(run, state, f"{key}/{method}")
                    run.info(f"seed {seed} {name}/{method}: reward {row['reward']:.3f} (initial "
                             f"{row['reward_initial']:.3f}), small-std inputs {row['reward_small_std']:.3f}, "
                             f"zero-std share {row['frac_zero_std_mean']:.2f}, {row['rft_steps']} steps")
    keys = [f"{s}-{t}" for s in cfg.seeds for t in cfg.finetune_tasks]
    parts = lambda suffix: pd.concat([pd.read_parquet(run.path / "parts" / f"{k}-{suffix}.parquet")  # noqa: E731
                                      for k in keys], ignore_index=True)
    run.write_table("inputs", pd.concat([parts("initial")] + [parts(m) for m in cfg.methods], ignore_index=True))
    run.write_table("methods", pd.concat([parts(f"{m}-row") for m in cfg.methods], ignore_index=True))
    labelled = [parts(f"{m}-labelled") for m in cfg.methods if METHODS[m][0]]
    if labelled:
        run.write_table("labelled", pd.concat(labelled, ignore_index=True).drop_duplicates(ignore_index=True))


def _write_part(run, name: str, frame) -> None:
    run.write_table(f"parts/{name}", frame)


def _mark_done(run, state: dict, key: str) -> None:
    state["done"].append(key)
    run.save_checkpoint(state)


def select_labelled(initial, n: int, how: str, seed: int) -> list[int]:
    """The ``n`` input_ids to label: the lowest initial reward std first, ties broken by the lowest mean reward
    (``low_std``), or a uniform draw without replacement (``random``), both among the measured inputs."""
    import numpy as np

    if how == "low_std":
        ranked = initial.sort_values(["reward_std", "reward_mean", "input_id"], kind="stable")
        return ranked.input_id.head(n).astype(int).tolist()
    return sorted(np.random.default_rng(seed).choice(initial.input_id.to_numpy(), n, replace=False).tolist())


def _run_method(cfg: Config, run, stages: TaskStages, initial, method: str, seed: int, bar):
    """SFT on the labelled subset (SFT methods), RFT to the sample budget, final statistics; (table, row)."""
    import numpy as np

    selection, normalize_std, filter_zero_std = METHODS[method]
    model = stages.fresh()
    labels: list[int] = []
    if selection is not None:
        n = max(1, round(cfg.label_fraction * len(stages.train_examples)))
        labels = select_labelled(initial, n, selection, seed)
        chosen = initial.set_index("input_id").loc[labels]
        _write_part(run, f"{seed}-{stages.name}-{method}-labelled", chosen.reset_index().assign(
            seed=seed, task=stages.name, selection=selection)[["seed", "task", "selection", "input_id",
                                                               "reward_mean", "reward_std"]])
        stages.sft(model, examples=[stages.stats_examples[i] for i in labels], log={"seed": seed, "method": method})
    rft = replace(cfg.rft, normalize_std=normalize_std, filter_zero_std=filter_zero_std)
    history = _rft(stages, model, rft, method, seed, bar)
    table = stages.measure(model, method).assign(seed=seed)
    small = initial.reward_std.to_numpy() < SMALL_STD
    table["initial_reward_std"] = initial.reward_std.to_numpy()
    row = {"task": stages.name, "method": method, "seed": seed,
           "reward": table.reward_mean.mean(), "reward_small_std": table.reward_mean[small].mean(),
           "reward_initial": initial.reward_mean.mean(), "reward_small_std_initial": initial.reward_mean[small].mean(),
           "n_small_std": int(small.sum()), "frac_zero_std_mean": float(np.mean(history["frac"])),
           "samples_used": int(history["samples"]), "labels_used": len(labels),
           "selection_samples": len(initial) * cfg.stats.k if selection == "low_std" else 0,
           "rft_steps": len(history["frac"])}
    return table, row


def _rft(stages: TaskStages, model, rft: RFTConfig, method: str, seed: int, bar) -> dict:
    """REINFORCE steps (with dynamic sampling when ``rft.filter_zero_std``) until ``steps·batch_prompts·k``
    completions are sampled; prompts drawn uniformly from the train inputs by a generator seeded with ``seed``."""
    import torch

    from rftlab.rl import train

    gen = torch.Generator().manual_seed(seed)
    examples, budget = stages.train_examples, rft.steps * rft.batch_prompts * rft.k

    def draw(n: int):
        batch = [examples[i] for i in torch.randint(len(examples), (n,), generator=gen).tolist()]
        return [ex.prompt for ex in batch], stages.scorer(batch)

    optimizer = train.optimizer_for(model, rft.lr)
    used, fracs = 0, []
    while used < budget:
        stats = train.dynamic_sampling_step(model, optimizer, stages.tokenizer, draw, rft, stages.generation,
                                            max_samples=budget - used)
        used += stats["samples"]
        fracs.append(stats["frac_reward_zero_std"])
        stages.run.log(seed=seed, task=stages.name, stage=method, step=len(fracs) - 1, samples_used=used, **stats)
        bar.advance(stats["samples"] / (rft.batch_prompts * rft.k))
    return {"samples": used, "frac": fracs}


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Per task: final reward and reward of the initially small-std inputs per method (bars: mean ± std over
    seeds, dots: seeds), and the share of zero-std groups per rollout over the sample budget."""
    import numpy as np
    import pandas as pd

    from rftlab import plotting
    from rftlab.results import read_metrics, read_table

    rows = pd.concat([read_table(r, "methods").assign(run=i) for i, r in enumerate(runs)], ignore_index=True)
    metrics = pd.concat([read_metrics(r).assign(run=i) for i, r in enumerate(runs)], ignore_index=True)
    methods = [m for m in METHODS if m in set(rows.method)]
    tasks = list(dict.fromkeys(rows.task))
    colors = dict(zip(METHODS, ("#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#17becf"), strict=True))
    fig, axes = plotting.figure(ncols=3, nrows=len(tasks), width=4.3, height=3.3)
    x = np.arange(len(methods))
    for r, task in enumerate(tasks):
        part = rows[rows.task == task]
        for c, (column, title) in enumerate((("reward", "final train reward"),
                                             ("reward_small_std", f"reward of inputs with initial std < {SMALL_STD}"))):
            ax = axes[r][c]
            stats = part.groupby("method")[column].agg(["mean", "std", "count"]).reindex(methods)
            ax.bar(x, stats["mean"], yerr=stats["std"].fillna(0), capsize=3, color=[colors[m] for m in methods],
                   alpha=0.8)
            for i, m in enumerate(methods):
                seeds = part[part.method == m][column]
                ax.scatter(np.full(len(seeds), i), seeds, s=9, color="k", zorder=3, linewidths=0)
            initial = part[f"{column}_initial"].mean()
            ax.axhline(initial, color="k", ls="--", lw=0.8, label=f"pretrained ({initial:.3f})")
            lo = min(initial, (stats["mean"] - stats["std"].fillna(0)).min(), part[column].min())
            hi = max((stats["mean"] + stats["std"].fillna(0)).max(), part[column].max())
            pad = max(hi - lo, 0.01)
            ax.set_ylim(max(0.0, lo - 0.15 * pad), hi + 0.1 * pad)
            ax.set_xticks(x)
            ax.set_xticklabels([LABELS[m] for m in methods], rotation=35, ha="right", fontsize=7.5)
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.legend(loc="best", fontsize=7, framealpha=0.9)
            n_seeds = int(stats["count"].max())
            ax.set_ylabel(f"reward (mean ± std, {n_seeds} seeds)")
        ax = axes[r][2]
        rft = metrics[(metrics.task == task) & metrics.stage.isin(methods)].dropna(subset=["samples_used"])
        budget = rft.samples_used.max()
        edges = np.linspace(0, budget, 11)
        rft = rft.assign(bin=pd.cut(rft.samples_used, edges, labels=(edges[1:] + edges[:-1]) / 2))
        for m in methods:
            curve = rft[rft.stage == m].groupby("bin", observed=True).frac_reward_zero_std.mean()
            ax.plot(curve.index.astype(float), curve.values, marker="o", ms=3, color=colors[m], label=LABELS[m])
        ax.set(xlabel="sampled completions (budget)", ylabel="frac_reward_zero_std",
               title=f"{task}: share of zero-std groups per rollout")
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, budget)
        ax.legend(fontsize=6.5, loc="best")
    fig.suptitle("RFT mitigations at an equal sample and label budget (bars: mean ± std over seeds; dots: seeds)")
    return [plotting.save(fig, out_dir, "rft_mitigations", fmt)]
