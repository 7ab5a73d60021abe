"""``rftlab diagnose rewards``: which of your prompts will RL finetuning barely move? (Razin et al., ICLR 2024)

For a prompt x and the model's output distribution π(·|x), the expected reward V(x) = E_{y~π(·|x)}[r(x, y)] has
a gradient bounded by the reward's standard deviation under the model (Theorem 1):

    ‖∇θ V(x)‖ ≤ 6 · L · γ(x; θ) · STD_{y~π(·|x)}[r(x, y)]^(2/3),

so prompts on which every sample earns about the same reward (small std; typically the ones the model is
confidently wrong on, at low mean reward) get almost no gradient from RL finetuning, whatever the learning rate.
The paper's remedy is a short SFT phase: labelling even a few of these prompts raises their std.

Per prompt this samples K completions (the same batched, KV-cached sampler and per-input statistics as the
``grue`` experiment: equal model, prompts, settings and seed give equal rewards), scores them, and reports the
reward mean and std, the share of prompts under each std threshold, and, on a subset spread over the std range,
the sampled expected-gradient norm ‖ĝ(x)‖ with ĝ(x) = (1/K) Σ_k (r_k − r̄_{−k}) ∇θ log π(y_k|x) (leave-one-out
baseline; 0 when the K rewards are equal). It recommends an SFT subset sized by ``label_budget``: among the
prompts whose mean reward is below the average, the lowest reward std first (ties: lowest mean first).

Writes ``prompts.parquet`` (one row per prompt), ``samples.parquet`` (one row per completion),
``sft_subset.jsonl`` (the recommended prompts with their data columns, ready to label) and ``summary.md``.
Figures: reward std histogram, reward mean vs std (the paper's Fig. 1), gradient norm vs std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rftlab.diagnose.inputs import check_path
from rftlab.errors import RftlabError

VERSION = 1

METRICS = {
    "prompts.parquet": "per prompt: prompt_id, prompt, reward_mean, reward_std (population std of the K rewards), "
    "reward_min, reward_max, rewards (K), grad_norm (sampled ‖∇θ V(x)‖ on the measured subset, else NaN), "
    "grad_reward_std (std of the K samples the estimate used), sft_rank (0, 1, … in recommendation order; −1 = "
    "not recommended), recommended",
    "samples.parquet": "per completion: prompt_id, sample, completion, reward",
    "metrics (one row)": "n_prompts, k, reward_mean, frac_std_below_<t> per threshold, n_recommended, "
    "grad_std_spearman (rank correlation of gradient norm and std on the measured subset)",
}


@dataclass(frozen=True)
class Config:
    model: str = ""  # hub name in the local cache, a save_pretrained folder, or a PEFT adapter folder
    adapter: str = ""  # PEFT adapter folder applied to the model ("" = none)
    prompts: str = ""  # .jsonl/.json/.csv/.parquet, a datasets folder, or a cached hub data set
    prompt_column: str = "prompt"  # column of prompts (strings, or chat messages rendered by the chat template)
    reward: str = ""  # a registered reward (bleu, rouge_l_max, ...) or a user function 'module:function'
    k: int = 10  # samples per prompt for the reward statistics (the paper: 10)
    max_new_tokens: int = 32  # tokens sampled per completion
    min_new_tokens: int = 0  # no EOS before this many tokens
    temperature: float = 1.0  # sampling temperature τ
    top_k: int = 0  # top-k truncation (0 = none: the model's own distribution, which the theorem is about)
    top_p: float = 1.0  # nucleus truncation (1 = none)
    max_prompt_length: int = 0  # truncate prompts to this many tokens (0 = no truncation)
    max_prompts: int = 0  # diagnose only the first N prompts (0 = all)
    grad_prompts: int = 32  # prompts whose expected-gradient norm is estimated, spread over the std range (0 = none)
    thresholds: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1)  # report the share of prompts with reward std ≤ t
    small_std: float = 0.05  # "small std" in the summary and figures (Razin et al. use 0.05 for GRUE rewards)
    label_budget: float = 0.01  # SFT subset size: a share of the prompts (< 1) or a count (≥ 1); at least 1
    batch_size: int = 32  # prompts per sampling call (batch_size · k sequences)
    seed: int = 0  # seeds the samples
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError("k must be at least 2: a reward std needs two samples per prompt")
        if self.label_budget <= 0:
            raise ValueError("label_budget must be > 0 (a share below 1 or a count of prompts)")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.grad_prompts < 0 or self.max_prompts < 0:
            raise ValueError("max_new_tokens and batch_size must be ≥ 1; grad_prompts and max_prompts ≥ 0")


def check_processes(cfg: Config, n: int) -> None:
    """Any number of processes: the prompts are split between them in chunks of ``batch_size``, each chunk
    sampled with its own seed, so the rewards equal a one-process run's."""


def check(cfg: Config) -> None:
    """Before a run folder exists: the three required inputs are given and local paths exist."""
    for flag, value in (("--model", cfg.model), ("--prompts", cfg.prompts), ("--reward", cfg.reward)):
        if not value:
            raise RftlabError(f"diagnose rewards needs {flag} (see `rftlab diagnose rewards --help`).")
    check_path("prompts", cfg.prompts)
    check_path("model", cfg.model, folder=True)
    if cfg.adapter:
        check_path("adapter", cfg.adapter, folder=True)
    from rftlab import rewards

    rewards.get_reward(cfg.reward)  # an unknown name or an import error fails here, before any sampling


def label_budget(cfg: Config, n: int) -> int:
    """Prompts to recommend: round(share · n) for a share < 1, else the count; at least 1, at most n."""
    size = round(cfg.label_budget * n) if cfg.label_budget < 1 else int(cfg.label_budget)
    return min(n, max(1, size))


def recommend(reward_mean, reward_std, budget: int):
    """Indices of the SFT subset, in order: prompts with mean reward below the average of all prompts (the model
    is wrong on them), lowest std first, ties by lowest mean; then, if the budget is larger, the other prompts
    in the same order. (N,), (N,) → (budget,) int."""
    import numpy as np

    mean, std = np.asarray(reward_mean, float), np.asarray(reward_std, float)
    low = mean < mean.mean()
    order = np.lexsort((mean, std, ~low))  # last key first: low-mean prompts, then std, then mean
    return order[:budget]


def grad_subset(reward_std, n: int):
    """``n`` prompt indices spread evenly over the std ranking (both ends included), so the gradient-norm
    figure covers small and large std alike. (N,) → (min(n, N),) int, sorted."""
    import numpy as np

    order = np.argsort(np.asarray(reward_std), kind="stable")
    if n >= len(order):
        return np.sort(order)
    return np.sort(order[np.unique(np.linspace(0, len(order) - 1, n).round().astype(int))])


def run(cfg: Config, run) -> None:
    import numpy as np
    import pandas as pd

    from rftlab import runtime
    from rftlab.diagnose.inputs import load_model, load_prompts, load_reward
    from rftlab.results import atomic_write_text
    from rftlab.rl import train

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.adapter, device=run.device)
    rows = load_prompts(cfg.prompts, cfg.prompt_column, tokenizer, cfg.max_prompts)
    score = load_reward(cfg.reward, rows)
    prompts = [r.prompt for r in rows]
    generation = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens, "top_k": cfg.top_k,
                  "top_p": cfg.top_p,
                  "max_prompt_length": cfg.max_prompt_length or None}
    n_grad = min(cfg.grad_prompts, len(rows))
    with run.progress(len(rows) + n_grad, "diagnose rewards") as bar:
        # grue's own measurement: chunks of batch_size prompts, each with its seed, split between processes
        rewards, texts = train.per_input_rewards(model, tokenizer, prompts, score, cfg.k, generation,
                                                 temperature=cfg.temperature, seed=cfg.seed,
                                                 batch_size=cfg.batch_size, progress=bar.advance)
        mean, std = rewards.mean(1), rewards.std(1)
        grad_norm, grad_std = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
        chosen = grad_subset(std, n_grad) if n_grad else np.zeros(0, int)
        # chunks of 8 prompts (one rollout of 8·K each), seeded and split between processes
        norms, used = train.expected_gradient_norms(
            model, tokenizer, [prompts[i] for i in chosen], lambda idx, t: score(chosen[idx].tolist(), t), cfg.k,
            generation, temperature=cfg.temperature, seed=cfg.seed + 1, batch_size=8, progress=bar.advance)
        grad_norm[chosen], grad_std[chosen] = norms, used.std(1)
    budget = label_budget(cfg, len(rows))
    sft = recommend(mean, std, budget)
    rank = np.full(len(rows), -1)
    rank[sft] = np.arange(len(sft))
    table = pd.DataFrame({
        "prompt_id": np.arange(len(rows)), "prompt": prompts, "reward_mean": mean, "reward_std": std,
        "reward_min": rewards.min(1), "reward_max": rewards.max(1), "rewards": list(rewards),
        "grad_norm": grad_norm, "grad_reward_std": grad_std, "sft_rank": rank, "recommended": rank >= 0,
    })
    run.write_table("prompts", table)
    run.write_table("samples", pd.DataFrame({
        "prompt_id": np.repeat(np.arange(len(rows)), cfg.k), "sample": np.tile(np.arange(cfg.k), len(rows)),
        "completion": texts, "reward": rewards.ravel()}))
    subset = [{"prompt": rows[i].prompt, **({"references": rows[i].references} if rows[i].references else {}),
               **rows[i].extra} for i in sft]
    headline = summarize(cfg, table)
    run.log(headline)
    if run.is_main:  # the others hold the same tables and write nothing
        atomic_write_text(run.path / "sft_subset.jsonl",
                          pd.DataFrame(subset).to_json(orient="records", lines=True))
        atomic_write_text(run.path / "summary.md", summary_markdown(cfg, table, headline))
    run.info(f"{len(rows)} prompts × {cfg.k} samples: mean reward {mean.mean():.3f}; reward std ≤ "
             f"{cfg.small_std:g} on {(std <= cfg.small_std).mean():.0%}; SFT subset of {len(sft)} in sft_subset.jsonl")


def summarize(cfg: Config, table) -> dict[str, float]:
    """The headline numbers of one diagnosis (also the single metrics row)."""
    from scipy.stats import spearmanr

    measured = table[table.grad_norm.notna()]
    rho = float(spearmanr(measured.grad_reward_std, measured.grad_norm).statistic) if len(measured) > 2 and \
        measured.grad_norm.nunique() > 1 and measured.grad_reward_std.nunique() > 1 else float("nan")
    out = {"n_prompts": len(table), "k": cfg.k, "reward_mean": float(table.reward_mean.mean()),
           "reward_std_mean": float(table.reward_std.mean())}
    for t in cfg.thresholds:
        out[f"frac_std_below_{t:g}"] = float((table.reward_std <= t).mean())
    out.update(n_recommended=int(table.recommended.sum()), n_grad=len(measured), grad_std_spearman=rho)
    return out


def summary_markdown(cfg: Config, table, headline: dict) -> str:
    """The findings as markdown: shares under each threshold, the prompts whose gradients vanish, the subset."""
    def clip(text: str, n: int = 70) -> str:
        text = " ".join(str(text).split()).replace("|", "\\|")
        return text if len(text) <= n else text[: n - 1] + "…"

    lines = [f"# Reward statistics of `{cfg.model}` on `{cfg.prompts}`", "",
             f"{headline['n_prompts']} prompts × K = {cfg.k} samples (τ = {cfg.temperature:g}, up to "
             f"{cfg.max_new_tokens} new tokens), reward `{cfg.reward}`: mean reward {headline['reward_mean']:.3f}.",
             "", "| reward std ≤ | share of prompts |", "|---|---|"]
    lines += [f"| {t:g} | {headline[f'frac_std_below_{t:g}']:.1%} |" for t in cfg.thresholds]
    small = table[(table.reward_std <= cfg.small_std) & (table.reward_mean < table.reward_mean.mean())]
    lines += ["", f"**{len(small)} prompts ({len(small) / len(table):.1%}) have reward std ≤ {cfg.small_std:g} at "
              "below-average reward.** Their expected policy gradient is bounded by their reward std (Razin et "
              "al. 2024, Theorem 1), so RL finetuning barely moves them; a short SFT phase on labelled examples "
              "raises their std."]
    if headline["n_grad"]:
        rho = headline["grad_std_spearman"]
        lines += ["", f"Sampled gradient norms on {headline['n_grad']} prompts spread over the std range: Spearman "
                  f"correlation with the samples' reward std {rho:.2f}" + ("." if rho == rho else " (undefined).")]
    wrong = table[table.reward_mean < table.reward_mean.mean()]
    lowest = wrong.sort_values(["reward_std", "reward_mean"]).head(10)
    lines += ["", "## Where the gradient vanishes: lowest reward std at below-average reward", "",
              "| prompt_id | reward mean | reward std | prompt |", "|---|---|---|---|"]
    lines += [f"| {r.prompt_id} | {r.reward_mean:.3f} | {r.reward_std:.3f} | {clip(r.prompt)} |"
              for r in lowest.itertuples()]
    lines += ["", f"## Recommended SFT subset ({int(table.recommended.sum())} prompts, label budget "
              f"{cfg.label_budget:g})", "",
              "Below-average mean reward, lowest reward std first: `sft_subset.jsonl` holds them with their data "
              "columns, ready to label.", ""]
    return "\n".join(lines) + "\n"


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Reward std histogram, reward mean vs std per prompt (Fig. 1 style), sampled gradient norm vs std."""
    import json

    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from rftlab import plotting
    from rftlab.results import CONFIG_FILE, read_table

    table = read_table(runs[0], "prompts")
    small = json.loads((runs[0] / CONFIG_FILE).read_text())["config"].get("small_std", 0.05)
    fig, axes = plotting.figure(ncols=3, width=3.8, height=3.2)
    hist, scatter, grad = axes[0]
    top = max(float(table.reward_std.max()), small) * 1.05
    hist.hist(table.reward_std, bins=np.linspace(0, top, 31), color=plotting.COLORS["rest"])
    hist.axvline(small, color="k", ls=":", lw=0.8)
    share = float((table.reward_std <= small).mean())
    hist.set(xlabel="reward std over K samples", ylabel="prompts",
             title=f"{share:.0%} of prompts have std ≤ {small:g}")
    rest, rec = table[~table.recommended], table[table.recommended]
    scatter.scatter(rest.reward_std, rest.reward_mean, s=8, alpha=0.6, linewidths=0, color=plotting.COLORS["rest"],
                    label="prompts")
    scatter.scatter(rec.reward_std, rec.reward_mean, s=14, marker="x", color=plotting.COLORS["small_std"],
                    label=f"recommended for SFT ({len(rec)})")
    lo, hi = float(table.reward_min.min()), float(table.reward_max.max())
    if hi > lo:  # the largest std a reward in [lo, hi] can have at mean m: √((m − lo)(hi − m)), Bernoulli-like
        m = np.linspace(lo, hi, 200)
        scatter.plot(np.sqrt((m - lo) * (hi - m)), m, color=plotting.COLORS["bound"], lw=0.7, ls="--",
                     label="largest possible std")
    scatter.axvline(small, color="k", ls=":", lw=0.8)
    scatter.set(xlabel="reward std", ylabel="reward mean", title="Reward mean vs std per prompt")
    scatter.legend(loc="best", fontsize=7)
    measured = table[table.grad_norm.notna()]
    if measured.empty:
        grad.text(0.5, 0.5, "no gradient norms measured\n(grad_prompts = 0)", ha="center", va="center",
                  transform=grad.transAxes)
        grad.set_axis_off()
    else:
        floor_std, floor_grad = 1e-3, max(float(measured.grad_norm[measured.grad_norm > 0].min()) / 10, 1e-8) \
            if (measured.grad_norm > 0).any() else 1e-4
        grad.scatter(measured.grad_reward_std.clip(lower=floor_std), measured.grad_norm.clip(lower=floor_grad),
                     s=12, alpha=0.75, linewidths=0, color=plotting.COLORS["rft"])
        grad.set(xscale="log", yscale="log", xlabel=f"reward std of the K samples (< {floor_std:g} at {floor_std:g})",
                 ylabel=f"sampled ‖∇θ V(x)‖ (0 at {floor_grad:.0e})",
                 title=f"Gradient norm vs std ({len(measured)} prompts)")
        # stds often span about one decade, where matplotlib labels minor ticks in overlapping scientific
        # notation: label in plain numbers, at 1, 2, 5 × 10^k over a short range and at 10^k over a long one
        for axis, (low, high) in ((grad.xaxis, grad.get_xlim()), (grad.yaxis, grad.get_ylim())):
            subs = (1.0, 2.0, 5.0) if np.log10(high / low) < 2 else (1.0,)
            axis.set_major_locator(LogLocator(base=10, subs=subs))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(NullFormatter())
    fig.suptitle("Which prompts will RL finetuning move? (Razin et al. 2024: ‖∇V(x)‖ is bounded by the reward std)")
    return [plotting.save(fig, out_dir, "diagnose_rewards", fmt)]
