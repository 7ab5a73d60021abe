"""Gradient entanglement on a sentiment task (Yuan et al., arXiv 2410.13828, Fig. 4 and its heatmaps).

A small GPT-2 is pretrained on unlabelled reviews (``rftlab.data.sentiment``; cached), SFT'd on the chosen
responses of one data variant, then trained with DPO where the chosen response is the correct label and the
rejected one the wrong label, followed in both by the same continuation:

    label          response = the label token only                 (no shared token)
    short-suffix   label + 3–5 shared tokens
    long-suffix    label + 15–30 shared tokens

With g_w = ∇θ log π(y_w|x), g_l = ∇θ log π(y_l|x), a = ‖g_w‖², b = ‖g_l‖², ρ = ⟨g_w, g_l⟩, DPO moves
log π(y_w|x) at rate ∝ a − ρ and log π(y_l|x) at rate ∝ ρ − b. Shared tokens make g_w and g_l share a large
component, so the cosine κ = ρ/√(ab) grows with the shared suffix and the chosen log-prob can fall (ρ > a)
while the margin grows. The experiment measures, per variant and seed: held-out chosen/rejected log-probs
(summed and per token) and margins every ``dpo.eval_every`` steps; the per-pair statistics (a, b, ρ, κ and the
DPO regime, ``rftlab.diagnostics.pair_gradient_stats``) every ``dpo.stats_every`` steps; and per-token gradient
cosine matrices (chosen tokens × rejected tokens) for a few pairs after SFT and after DPO.

The default preset uses plain SGD (the theory is gradient flow); the ``paper`` preset runs the official
recipe (GPT-2, SFT 128 steps lr 1.41e-5, DPO AdamW lr 5e-6, batch 32, β 0.1, one epoch) on local data.

CPU runtime of the default preset: about 4 min (2 cores, 3 seeds × 3 variants).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rftlab.lm_config import LMConfig
from rftlab.registry import experiment
from rftlab.sentiment_lm import PretrainConfig, SFTStageConfig

METRICS = {
    "seed, variant, step": "seed; data variant (label, short-suffix, long-suffix); DPO step (0 = after SFT)",
    "logps/chosen, logps/rejected": "held-out mean summed log π(y_w|x), log π(y_l|x) (TRL names)",
    "logps/chosen_per_token, logps/rejected_per_token": "the same divided by the response length",
    "logps/margin": "mean x_w − x_l",
    "rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies": "TRL's DPO rewards β(x − x_ref) on "
    "the held-out pairs, their difference and the share with a positive margin",
    "loss": "mean training DPO loss over the steps since the previous row",
    "grad/norm_chosen, grad/norm_rejected, grad/inner, grad/cosine": "means over the statistics pairs of ‖g_w‖, "
    "‖g_l‖, ρ and κ (rows at statistics steps only)",
    "regime/frac_chosen_down, regime/frac_rejected_up": "share of statistics pairs with ρ ≥ a (chosen falls "
    "under DPO's gradient flow) and with ρ ≥ b (rejected rises)",
    "pairs.parquet": "per (seed, variant, step, pair): norm_chosen, norm_rejected, inner, cosine, regime, logps",
    "heatmaps.parquet": "per (seed, variant, stage, pair, i, j): chosen/rejected token strings and the cosine of "
    "their per-token gradients (stage sft = before DPO, dpo = after)",
    "summary.parquet": "per (seed, variant): start/end chosen, rejected and margin, chosen_change, mean cosine at "
    "the start and over training, share of pairs with the chosen predicted to fall",
}
VARIANTS = ("label", "short-suffix", "long-suffix")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "files"] = "synthetic"  # template reviews, or local files (paper)
    variants: tuple[str, ...] = VARIANTS  # data variants to run
    data_dir: str = "data/sentiment"  # files: <data_dir>/<variant>.jsonl|.parquet|.csv or a datasets folder
    n_train: int = 512  # training pairs (SFT on their chosen responses, then DPO); files: 0 = all but n_eval
    n_eval: int = 64  # held-out pairs for the log-prob curves
    n_stats: int = 32  # held-out pairs for the gradient statistics (the first n_stats of the eval pairs)
    n_heatmap: int = 2  # pairs per variant with per-token cosine heatmaps (first seed only)

    def __post_init__(self) -> None:
        if bad := [v for v in self.variants if v not in VARIANTS]:
            raise ValueError(f"unknown data.variants {bad}; choose from {', '.join(VARIANTS)}")
        if not self.variants:
            raise ValueError("data.variants is empty")
        if self.n_stats > self.n_eval or self.n_heatmap > self.n_eval:
            raise ValueError("data.n_stats and data.n_heatmap must be ≤ data.n_eval (they are eval pairs)")
        if self.n_eval < 1 or self.n_train < 0 or (self.source == "synthetic" and self.n_train < 1):
            raise ValueError("data.n_eval must be ≥ 1 and data.n_train ≥ 1 (0 = all, files only)")


@dataclass(frozen=True)
class DPOConfig:
    loss: str = "dpo"  # a rftlab.preference loss name
    beta: float = 0.1  # β
    optimizer: Literal["sgd", "adamw"] = "sgd"  # plain SGD (gradient flow, the theory) or AdamW (TRL default)
    lr: float = 1e-2  # learning rate
    steps: int = 200  # optimizer steps (0 = one epoch over the training pairs)
    batch_size: int = 32  # pairs per step
    max_grad_norm: float = 0.0  # clip the global gradient norm (0 = off)
    eval_every: int = 10  # steps between held-out log-prob rows
    stats_every: int = 50  # steps between gradient statistics (0 = only before and after DPO)
    params: Literal["all", "last", "embeddings", "lora"] = "all"  # parameters the gradient statistics use

    def __post_init__(self) -> None:
        from rftlab.preference import get_method

        get_method(self.loss)  # unknown names fail here with close matches
        if self.eval_every < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("dpo.eval_every and dpo.batch_size must be ≥ 1 and dpo.lr > 0")


@experiment(name="entanglement-sentiment", paper="Yuan et al. 2024", figure="Fig. 4 (sentiment, heatmaps)",
            version=1, cpu_runtime="~4 min")
@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: LMConfig = field(default_factory=lambda: LMConfig(n_layer=2, n_embd=128, n_head=4, n_positions=64))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # 600 SFT steps: the label is learnt in every variant (held-out margin ≈ 7 nats at the start of DPO); with
    # 300 the per-token SFT loss dilutes the label in long-suffix responses and DPO spends its first steps on it
    sft: SFTStageConfig = field(default_factory=lambda: SFTStageConfig(steps=600))
    dpo: DPOConfig = field(default_factory=DPOConfig)
    seed: int = 0  # first seed; seeds seed … seed + n_seeds − 1 run in turn
    n_seeds: int = 3  # seeds (each: its own pretraining, data, SFT and DPO)
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        if self.n_seeds < 1:
            raise ValueError("n_seeds must be ≥ 1")


# ------------------------------------------------------------------------------------------------- data
def _examples(cfg: Config, variant: str, seed: int) -> tuple[list, list]:
    """(train, eval) lists of objects with .prompt, .chosen, .rejected strings."""
    if cfg.data.source == "synthetic":
        from rftlab.data import sentiment

        examples = sentiment.make_examples(cfg.data.n_train + cfg.data.n_eval, variant, seed)
        return examples[: cfg.data.n_train], examples[cfg.data.n_train:]
    from rftlab.data.preference_files import load_preference_pairs
    from rftlab.errors import RftlabError

    pairs = load_preference_pairs(_variant_path(Path(cfg.data.data_dir), variant), seed=seed)
    need = cfg.data.n_eval + max(cfg.data.n_train, 1)
    if len(pairs) < need:
        raise RftlabError(f"{cfg.data.data_dir}/{variant} holds {len(pairs)} pairs; data.n_train + data.n_eval "
                          f"need {need}. Lower them or add pairs.")
    eval_pairs, rest = pairs[: cfg.data.n_eval], pairs[cfg.data.n_eval:]
    return (rest[: cfg.data.n_train] if cfg.data.n_train else rest), eval_pairs


def _variant_path(data_dir: Path, variant: str) -> Path:
    """<data_dir>/<variant>.{jsonl,parquet,csv,json}, or the folder <data_dir>/<variant>[/preference]."""
    for candidate in (*(data_dir / f"{variant}{ext}" for ext in (".jsonl", ".parquet", ".csv", ".json")),
                      data_dir / variant / "preference", data_dir / variant):
        if candidate.exists():
            return candidate
    return data_dir / f"{variant}.jsonl"  # load_preference_pairs reports it missing


def _encode(tokenizer, examples, seq2seq: bool, device):
    from rftlab.preference_train import encode_preferences

    return encode_preferences(tokenizer, [e.prompt for e in examples], [e.chosen for e in examples],
                              [e.rejected for e in examples], seq2seq=seq2seq).to(device)


# -------------------------------------------------------------------------------------------------- run
def check(cfg: Config) -> None:
    """Before a run folder exists: local data files readable with enough pairs, a local model folder present."""
    from rftlab.errors import RftlabError

    if cfg.data.source == "files":
        for variant in cfg.data.variants:
            _examples(cfg, variant, cfg.seed)
    path = Path(cfg.model.name_or_path).expanduser()
    if cfg.model.name_or_path.startswith(("/", ".", "~")) and not path.is_dir():
        raise RftlabError(f"model.name_or_path {cfg.model.name_or_path!r} is not a folder: save a model there with "
                          "save_pretrained() or pass a Hugging Face hub name such as gpt2.")


def run(cfg: Config, run) -> None:
    import pandas as pd

    from rftlab import runtime

    runtime.set_threads(cfg.threads)
    state = run.load_checkpoint() or {"done": []}  # finished (seed, variant) units; their tables are in parts/
    (run.path / "parts").mkdir(exist_ok=True)
    units = [(seed, v) for seed in range(cfg.seed, cfg.seed + cfg.n_seeds) for v in cfg.data.variants]
    with run.progress(len(units), "entanglement-sentiment") as bar:
        for seed, variant in units:
            key = f"{seed}-{variant}"
            if key not in state["done"]:
                _run_unit(cfg, run, seed, variant, heatmaps=seed == cfg.seed)
                state["done"].append(key)
                run.save_checkpoint(state)
            bar.advance()
    names = [f"{seed}-{v}" for seed, v in units]
    for table in ("pairs", "heatmaps"):
        parts = [run.path / "parts" / f"{n}-{table}.parquet" for n in names]
        run.write_table(table, pd.concat([pd.read_parquet(p) for p in parts if p.exists()], ignore_index=True))
    summary = summarize(pd.concat([pd.read_parquet(run.path / "parts" / f"{n}-metrics.parquet") for n in names],
                                  ignore_index=True))
    run.write_table("summary", summary)
    for variant, group in summary.groupby("variant", sort=False):
        run.info(f"{variant}: chosen change {group.chosen_change.mean():+.2f} (seeds "
                 f"{', '.join(f'{x:+.2f}' for x in group.chosen_change)}), margin change "
                 f"{group.margin_change.mean():+.2f}, cosine at start {group.cosine_start.mean():+.2f}")


def _run_unit(cfg: Config, run, seed: int, variant: str, heatmaps: bool) -> None:
    """Pretrained (cached) → SFT on the variant's chosen responses → DPO with the measurements."""
    import pandas as pd

    from rftlab import models, runtime
    from rftlab.preference_train import with_reference
    from rftlab.sentiment_lm import pretrained_policy, sft_chosen

    runtime.seed_everything(seed)
    tokenizer, model = pretrained_policy(run, cfg.model, cfg.pretrain, seed)
    if cfg.model.lora_r:
        model = models.add_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, dropout=0.0)
    train_ex, eval_ex = _examples(cfg, variant, seed)
    seq2seq = models.is_seq2seq(model)
    train, held_out = _encode(tokenizer, train_ex, seq2seq, run.device), _encode(tokenizer, eval_ex, seq2seq,
                                                                                 run.device)
    model.eval()  # dropout off throughout: log-probs and gradients are deterministic functions of θ
    steps = cfg.dpo.steps or max(len(train) // cfg.dpo.batch_size, 1)
    with run.progress(cfg.sft.steps + steps, f"seed {seed} {variant}: SFT, DPO") as bar:
        sft_chosen(model, train, cfg.sft, seed, progress=bar)
        heat = (_heatmap_rows(cfg, tokenizer, held_out, seed, variant, model, "sft")
                if heatmaps and cfg.data.n_heatmap else [])
        reference = models.frozen_copy(model)
        train, held_out = with_reference(reference, train), with_reference(reference, held_out)
        del reference
        rows, pair_tables = _dpo(cfg, run, model, train, held_out, seed, variant, steps, bar)
    prefix = run.path / "parts" / f"{seed}-{variant}"
    if heat:
        heat += _heatmap_rows(cfg, tokenizer, held_out, seed, variant, model, "dpo")
        pd.DataFrame(heat).to_parquet(f"{prefix}-heatmaps.parquet")
    pd.concat(pair_tables, ignore_index=True).to_parquet(f"{prefix}-pairs.parquet")
    pd.DataFrame(rows).to_parquet(f"{prefix}-metrics.parquet")


def _dpo(cfg: Config, run, model, train, held_out, seed: int, variant: str, steps: int, bar):
    """``steps`` optimizer steps of ``cfg.dpo.loss``; held-out rows every eval_every steps (logged), gradient
    statistics every stats_every. Returns (rows, per-pair statistics tables)."""
    import numpy as np
    import torch

    from rftlab.diagnostics import pair_gradient_stats
    from rftlab.preference_train import evaluate, preference_step

    d = cfg.dpo
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=d.lr) if d.optimizer == "sgd" else torch.optim.AdamW(params, lr=d.lr)
    stats_pairs = held_out.select(range(cfg.data.n_stats)).token_lists()
    hparams = {"beta": d.beta} if "beta" in _defaults(d.loss) else {}
    gen = torch.Generator().manual_seed(seed)
    rows, pair_tables, losses = [], [], []
    for step in range(steps + 1):
        if step % d.eval_every == 0 or step == steps:
            row = {"seed": seed, "variant": variant, "step": step, **evaluate(model, held_out, d.beta)[0],
                   "loss": float(np.mean(losses)) if losses else np.nan}
            losses = []
            if step == 0 or step == steps or (d.stats_every and step % d.stats_every == 0):
                stats = pair_gradient_stats(model, *stats_pairs, params=d.params)
                row |= _stats_columns(stats)
                pair_tables.append(stats.assign(seed=seed, variant=variant, step=step,
                                                pair=np.arange(len(stats))))
            run.log(row)
            rows.append(row)
        if step < steps:
            idx = torch.randint(len(train), (min(d.batch_size, len(train)),), generator=gen)
            losses.append(preference_step(model, optimizer, train.select(idx), d.loss, hparams,
                                          d.max_grad_norm)["loss"])
            bar.advance()
    return rows, pair_tables


def _defaults(loss: str) -> dict:
    from rftlab.preference import get_method

    return dict(get_method(loss).defaults)


def _stats_columns(stats) -> dict[str, float]:
    regime = stats.regime
    return {"grad/norm_chosen": stats.norm_chosen.mean(), "grad/norm_rejected": stats.norm_rejected.mean(),
            "grad/inner": stats.inner.mean(), "grad/cosine": stats.cosine.mean(),
            "regime/frac_chosen_down": regime.isin(["chosen_down", "both"]).mean(),
            "regime/frac_rejected_up": regime.isin(["rejected_up", "both"]).mean()}


def _heatmap_rows(cfg: Config, tokenizer, held_out, seed: int, variant: str, model, stage: str) -> list[dict]:
    """Per-token gradient cosines of the first n_heatmap held-out pairs, one row per (pair, i, j)."""
    from rftlab.diagnostics import token_gradient_cosines

    prompts, chosen, rejected = held_out.select(range(cfg.data.n_heatmap)).token_lists()
    rows = []
    for pair, (x, y_w, y_l) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        matrix = token_gradient_cosines(model, x, y_w, y_l, params=cfg.dpo.params)
        words_w, words_l = tokenizer.convert_ids_to_tokens(y_w), tokenizer.convert_ids_to_tokens(y_l)
        rows += [{"seed": seed, "variant": variant, "stage": stage, "pair": pair, "i": i, "j": j,
                  "chosen_token": words_w[i], "rejected_token": words_l[j], "cosine": float(matrix[i, j])}
                 for i in range(len(y_w)) for j in range(len(y_l))]
    return rows


def summarize(metrics):
    """Per (seed, variant): held-out chosen / rejected / margin at the start and end of DPO, and the cosine."""
    import pandas as pd

    out = []
    for (seed, variant), group in metrics.groupby(["seed", "variant"], sort=False):
        group = group.sort_values("step")
        first, last = group.iloc[0], group.iloc[-1]
        stats = group.dropna(subset=["grad/cosine"])
        out.append({"seed": seed, "variant": variant, "chosen_start": first["logps/chosen"],
                    "chosen_end": last["logps/chosen"], "chosen_change": last["logps/chosen"] - first["logps/chosen"],
                    "rejected_change": last["logps/rejected"] - first["logps/rejected"],
                    "margin_start": first["logps/margin"], "margin_end": last["logps/margin"],
                    "margin_change": last["logps/margin"] - first["logps/margin"],
                    "cosine_start": first["grad/cosine"], "cosine_mean": stats["grad/cosine"].mean(),
                    "frac_chosen_down_mean": stats["regime/frac_chosen_down"].mean()})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------- plots
COLORS = {"label": "#1f77b4", "short-suffix": "#ff7f0e", "long-suffix": "#d62728"}


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Fig. 4 analogue: chosen/rejected log-prob curves per variant, margins, cosines, and the heatmaps."""
    import pandas as pd

    from rftlab.results import read_metrics, read_table

    metrics = pd.concat([read_metrics(r) for r in runs], ignore_index=True)
    heat = pd.concat([read_table(r, "heatmaps") for r in runs], ignore_index=True)
    return [_plot_curves(metrics, out_dir, fmt), _plot_heatmaps(heat, out_dir, fmt)]


def _band(ax, group, column: str, **style) -> None:
    """Mean over seeds with a min–max band."""
    stats = group.dropna(subset=[column]).groupby("step")[column].agg(["mean", "min", "max"])
    ax.plot(stats.index, stats["mean"], **style)
    ax.fill_between(stats.index, stats["min"], stats["max"], color=style.get("color"), alpha=0.15, lw=0)


def _plot_curves(metrics, out_dir: Path, fmt: str) -> Path:
    from rftlab import plotting

    variants = [v for v in VARIANTS if v in set(metrics.variant)]
    fig, axes = plotting.figure(ncols=4, nrows=2, width=3.5, height=3.0)
    n_seeds = metrics.seed.nunique()
    for ax, variant in zip(axes[0], variants, strict=False):
        group = metrics[metrics.variant == variant]
        base = group[group.step == 0]
        start_w, start_l = base["logps/chosen"].mean(), base["logps/rejected"].mean()
        shifted = group.assign(chosen=group["logps/chosen"] - start_w, rejected=group["logps/rejected"] - start_l)
        _band(ax, shifted, "chosen", color="#2ca02c", lw=2, label="chosen")
        _band(ax, shifted, "rejected", color="#d62728", lw=2, ls="--", label="rejected")
        ax.axhline(0, color="black", lw=0.6)
        ax.set(title=f"{variant} (start: chosen {start_w:.1f}, rejected {start_l:.1f})", xlabel="DPO step",
               ylabel="Δ log π (held-out, summed)")
        ax.legend(loc="lower left")
    margin_ax, cos_ax, down_ax = axes[1][0], axes[1][1], axes[1][2]
    for variant in variants:
        group = metrics[metrics.variant == variant]
        color = COLORS[variant]
        _band(margin_ax, group, "logps/margin", color=color, lw=1.8, label=variant)
        _band(cos_ax, group, "grad/cosine", color=color, lw=1.8, marker="o", ms=3, label=variant)
        _band(down_ax, group, "regime/frac_chosen_down", color=color, lw=1.8, marker="o", ms=3, label=variant)
    margin_ax.set(title="margin log π(y_w|x) − log π(y_l|x)", xlabel="DPO step", ylabel="held-out mean")
    cos_ax.axhline(0, color="black", lw=0.6)
    cos_ax.set(title="cos(g_w, g_l), all parameters", xlabel="DPO step", ylabel="mean over pairs", ylim=(-1.05, 1.05))
    down_ax.set(title="pairs with ρ ≥ a (chosen falls under DPO)", xlabel="DPO step", ylabel="share of pairs",
                ylim=(-0.02, 1.02))
    for ax in (margin_ax, cos_ax, down_ax):
        ax.legend(loc="best", fontsize=7)
    for ax in axes[0][len(variants):3]:
        ax.axis("off")
    _plot_changes(axes[0][3], summarize(metrics), variants)
    axes[1][3].axis("off")
    axes[1][3].text(0, 0.95, _READING, transform=axes[1][3].transAxes, va="top", fontsize=8, wrap=True)
    fig.suptitle(f"DPO on sentiment pairs with a shared suffix ({n_seeds} seed{'s' * (n_seeds > 1)}; "
                 "band = min–max over seeds)")
    return plotting.save(fig, out_dir, "entanglement_sentiment", fmt)


_READING = """Under DPO's gradient flow, with
g_w = ∇ log π(y_w|x), g_l = ∇ log π(y_l|x),
a = ‖g_w‖², b = ‖g_l‖², ρ = ⟨g_w, g_l⟩:
  d log π(y_w|x) ∝ a − ρ,   d log π(y_l|x) ∝ ρ − b.
Shared suffix tokens add a common component
to g_w and g_l (cosine ↑), and the chosen
log-prob falls while the margin grows.

label: as π(y_w|x) → 1, a → 0, so ρ ≥ a holds
late in training while log π(y_w|x) stays ≈ 0."""


def _plot_changes(ax, summary, variants: list[str]) -> None:
    """Bars: mean change of the held-out chosen log-prob over DPO per variant; dots: the seeds."""
    for x, variant in enumerate(variants):
        values = summary[summary.variant == variant].chosen_change
        ax.bar(x, values.mean(), 0.6, color=COLORS[variant], alpha=0.7)
        ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(variants)), variants)
    ax.set(title="Δ chosen log π over DPO (dots: seeds)", ylabel="held-out, summed")


def _plot_heatmaps(heat, out_dir: Path, fmt: str) -> Path:
    """Per-token gradient cosines (chosen tokens × rejected tokens) of the first held-out pair of each variant,
    after SFT (top row) and after DPO (bottom row)."""
    import numpy as np

    from rftlab import plotting

    variants = [v for v in VARIANTS if v in set(heat.variant)] if len(heat) else []
    stages = [s for s in ("sft", "dpo") if len(heat) and s in set(heat.stage)]
    fig, axes = plotting.figure(ncols=max(len(variants), 1), nrows=max(len(stages), 1), width=4.4, height=4.2,
                                width_ratios=_widths(heat, variants))
    for row, stage in enumerate(stages):
        for ax, variant in zip(axes[row], variants, strict=True):
            sub = heat[(heat.variant == variant) & (heat.stage == stage)]
            sub = sub[(sub.seed == sub.seed.min()) & (sub.pair == sub.pair.min())]
            n_w, n_l = sub.i.max() + 1, sub.j.max() + 1
            grid = np.full((n_w, n_l), np.nan)
            grid[sub.i, sub.j] = sub.cosine
            image = ax.imshow(grid, cmap="bwr", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
            size = 8 if max(n_w, n_l) <= 8 else 5
            ax.set_yticks(range(n_w), sub.drop_duplicates("i").sort_values("i").chosen_token, fontsize=size)
            ax.set_xticks(range(n_l), sub.drop_duplicates("j").sort_values("j").rejected_token, fontsize=size,
                          rotation=90)
            ax.grid(False)
            if n_w * n_l <= 30:  # small grids: print the values
                for i, j, value in zip(sub.i, sub.j, sub.cosine, strict=True):
                    ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7)
            where = "after SFT" if stage == "sft" else "after DPO"
            ax.set(title=f"{variant}, {where}", xlabel="rejected tokens", ylabel="chosen tokens")
        fig.colorbar(image, ax=axes[row][-1], fraction=0.05, pad=0.02, label="cosine")
    if not variants:
        axes[0][0].axis("off")
    fig.suptitle("cosine of per-token gradients ∇θ log π(y_t | x, y_<t), one held-out pair per variant")
    return plotting.save(fig, out_dir, "entanglement_sentiment_heatmap", fmt)


def _widths(heat, variants: list[str]) -> list[float] | None:
    """Panel widths ∝ the rejected response length (a 1-token label panel stays narrow)."""
    if not variants:
        return None
    return [max(2.0, float(heat[heat.variant == v].j.max() + 1) ** 0.8) for v in variants]
