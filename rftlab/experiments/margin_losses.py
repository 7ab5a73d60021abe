"""The margin-based preference losses side by side (Yuan et al., arXiv 2410.13828, Fig. 1–2 and Table 2).

Every loss of the family (DPO, IPO, SLiC, R-DPO, SimPO, DPOP, CPO, RPO, RRHF, ORPO) and the pairwise-normalised
update Σ_i (g_w,i/‖g_w,i‖ − g_l,i/‖g_l,i‖) trains the SAME policy (a tiny GPT-2 pretrained and SFT'd on the
sentiment task, ``rftlab.sentiment_lm``) on the SAME preference pairs, in the same batch order, once with SGD
and once with AdamW. Logged per loss and optimizer: eval-set chosen / rejected log-probs and the reward
margin (Fig. 2's curves). At checkpoints, on P probe pairs: a = ‖g_w‖², b = ‖g_l‖², ρ = ⟨g_w, g_l⟩
(``diagnostics.pair_gradient_stats``), the general-form thresholds (``preference.threshold_coefficients``) and
the first-order predicted change of x_w = log π(y_w|x) and x_l (``preference.predicted_changes`` with
``loss_partials``); then the OBSERVED change: one SGD step of size η on that pair's loss alone, from the
current parameters, gradient-clipped like a training step (batch-size-1 SGD), after which the parameters are
restored. Pairs in a batch interact; a step on one pair does not, so the prediction (which is per pair) meets
a clean observation. η defaults to the SGD learning rate over the batch size: pair i's share of a step.

The pairwise-normalised update is the backward of −Σ_i (x_w,i/‖g_w,i‖ − x_l,i/‖g_l,i‖)/B with the norms
measured by ``pair_gradient_stats`` and held constant; its thresholds are ‖g_l‖/‖g_w‖ and ‖g_w‖/‖g_l‖, i.e. the
chosen falls (or the rejected rises) only if κ > 1, never.

A second data set isolates the cause: pairs whose rejected response substitutes k of the chosen's n tokens
(``rftlab.data.edit_pairs``); κ = cos(g_w, g_l) under the starting policy, against the shared fraction (n−k)/n.

The claims: the predicted regime (chosen ↓ / rejected ↑) is the observed one; losses with an explicit chosen
term (CPO, RPO, DPOP, RRHF, ORPO) raise the rejected log-prob on pairs where DPO lowers it; the normalised
update raises the chosen and lowers the rejected of the pair it is taken on; κ grows with the shared-token
fraction. The normalised update's guarantee is first order and about the pair the step is taken on: on the
default preset its eval curves (held-out pairs, batch steps) still fall on both sides like DPO's, plausibly
because held-out pairs share the recurring suffix words with training pairs; it never saturates, so under SGD
it keeps going.

On N processes (``rftlab run margin-losses --num-processes N``, ``accelerate launch``) each step's batch is split
into equal shards with DDP averaging the gradients (the same update as one process, up to float rounding), and
the probe and edit pairs are split between the processes and gathered; pretraining, SFT and the eval-set
measurements run whole on every process (identical results; they are cheap next to the diagnostics).

CPU runtime of the default preset: about 3 min on 2 cores (1 thread), plus 45 s of pretraining on the first run
(cached after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rftlab.errors import RftlabError
from rftlab.lm_config import LMConfig
from rftlab.registry import experiment
from rftlab.sentiment_lm import PretrainConfig, SFTStageConfig

NORMALIZED = "pairwise-normalized"
LOSSES = ("dpo", "ipo", "slic", "rdpo", "simpo", "dpop", "cpo", "rpo", "rrhf", "orpo", NORMALIZED)
REGIMES = ("ideal", "chosen_down", "rejected_up", "both")

TRAINING_OPTIONS = True  # trains under `rftlab run --precision` and `--compile` (bf16 autocast, torch.compile)

METRICS = {
    "optimizer, loss, step": "sgd/adamw, update rule (a preference loss or 'pairwise-normalized'), steps done",
    "logps/chosen, logps/rejected": "eval-set mean of x_w = log π(y_w|x), x_l (summed over response tokens)",
    "rewards/margins": "eval-set mean β((x_w − x_w^0) − (x_l − x_l^0)), x^0 under the starting (SFT'd) policy",
    "loss_value": "eval-set mean of the loss (none for pairwise-normalized)",
    "grad/norm_chosen, grad/norm_rejected": "probe-pair mean ‖g_w‖, ‖g_l‖ (checkpoints only)",
    "grad/inner, grad/cosine": "probe-pair mean ρ = ⟨g_w, g_l⟩ and κ = ρ/(‖g_w‖‖g_l‖)",
    "regime/frac_chosen_down, regime/frac_rejected_up": "share of probe pairs predicted to lower x_w / raise x_l",
    "regime/obs_frac_chosen_down, regime/obs_frac_rejected_up": "the same, observed after the one-pair step",
    "regime/match": "share of probe pairs whose predicted signs of Δx_w and Δx_l are both the observed ones",
    "probes.parquet": "per (optimizer, loss, step, pair): a, b, rho, cosine, d_w, d_l, c_chosen, c_rejected, "
    "pred_dw, pred_dl, obs_dw, obs_dl, pred_regime, obs_regime, match",
    "regimes.parquet": "per (optimizer, loss): predicted and observed regime shares, match_rate, "
    "rejected_up_where_dpo_down (probe (pair, step) where this loss raises x_l and DPO lowers it)",
    "edit_pairs.parquet": "per edit pair: k, shared_fraction, norms, inner, cosine under the starting policy",
}


@experiment(name="margin-losses", paper="Yuan et al. 2024", figure="Fig. 1–2, Table 2", version=1,
            cpu_runtime="~4 min")
@dataclass(frozen=True)
class Config:
    model: LMConfig = field(default_factory=lambda: LMConfig(n_layer=2, n_embd=128, n_head=4, n_positions=128))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # cached causal-LM stage (tiny model only)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)  # SFT on the chosen responses (0 steps: none)
    lora_targets: tuple[str, ...] = ()  # LoRA modules when model.lora_r > 0 (() = peft's default; GPT-2 c_attn)
    data_path: str = ""  # local pairs (jsonl/csv/parquet/datasets folder); "" = the sentiment task
    eval_data_path: str = ""  # held-out pairs for eval and probes; "" = split off the training source
    variant: str = "short-suffix"  # sentiment variant of the training pairs (label / short-suffix / long-suffix)
    n_train: int = 256  # training pairs (0 = every pair of data_path)
    n_eval: int = 128  # eval pairs (Fig. 2's curves; paper: 2048)
    n_probe: int = 32  # P, probe pairs of the regime check (paper: 512)
    max_prompt_length: int = 0  # prompt tokens kept (cut on the tokenizer's truncation_side; 0 = all)
    losses: tuple[str, ...] = LOSSES  # preference.METHODS names and/or 'pairwise-normalized'
    optimizers: tuple[str, ...] = ("sgd", "adamw")  # each loss runs once per optimizer
    steps: int = 120  # optimizer steps per run (0 = one epoch of the training pairs)
    batch_size: int = 16  # pairs per step (paper: effective batch 16)
    micro_batch_size: int = 0  # pairs per forward/backward, gradients accumulated (0 = whole batch)
    sgd_lr: float = 0.5  # SGD learning rate
    adamw_lr: float = 1e-4  # AdamW learning rate (paper: 5e-6 on Llama-3-8B with LoRA)
    max_grad_norm: float = 1.0  # gradient-norm clipping of every step, probes included (TRL's default; 0 = off)
    probe_lr: float = 0.0  # η of the one-pair observation step (0 = sgd_lr / batch_size)
    eval_every: int = 10  # steps between eval-set measurements (paper: 200)
    probe_every: int = 40  # steps between regime checkpoints, plus step 0 and the last (paper: 400)
    grad_params: Literal["all", "last", "embeddings", "lora"] = "all"  # θ of g_w, g_l (LoRA runs: "lora")
    stats_chunk_size: int = 32  # sequences per chunk of pair_gradient_stats
    beta: float = 0.1  # β of every loss that has one (paper: 0.1)
    rdpo_alpha: float = 0.2  # R-DPO length coefficient α (paper code: 0.2)
    dpop_lambda: float = 50.0  # DPOP λ (paper code: 50)
    simpo_gamma: float = 0.5  # SimPO target margin γ (paper code: 0.5 with β 0.1)
    nll_alpha: float = 1.0  # α of the NLL term of CPO, RPO and RRHF (paper code: cpo_alpha 1)
    edit_length: int = 16  # n, tokens of an edit pair's responses
    edit_ks: tuple[int, ...] = (1, 2, 4, 8, 12, 16)  # k, substituted tokens (shared fraction (n − k)/n)
    edit_pairs: int = 24  # responses per k
    seed: int = 0  # data, model initialisation and batch order
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        from rftlab.data.sentiment import VARIANTS
        from rftlab.preference import get_method

        for name in self.losses:
            if name != NORMALIZED:
                get_method(name)  # one-line error with close matches for an unknown name
        if bad := sorted(set(self.optimizers) - {"sgd", "adamw"}):
            raise ValueError(f"unknown optimizers {bad}: use 'sgd' and/or 'adamw'")
        if not self.data_path and self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose from {', '.join(VARIANTS)}")
        if any(not 0 < k <= self.edit_length for k in self.edit_ks):
            raise ValueError(f"edit_ks must lie in 1..edit_length={self.edit_length}")
        if self.n_probe < 1 or self.n_eval < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("n_probe, n_eval, batch_size and eval_every must be positive")
        if self.probe_every % self.eval_every:
            raise ValueError("probe_every must be a multiple of eval_every (checkpoints are eval steps)")


def check_processes(cfg: Config, n: int) -> None:
    """Runs on n processes when every training batch splits evenly."""
    from rftlab.distributed import require_multiples

    require_multiples(n, {"batch_size": cfg.batch_size})


def _hparams(cfg: Config, name: str) -> dict[str, float]:
    """The paper's hyperparameters for the keys the method takes; the rest stay at its defaults."""
    from rftlab.preference import get_method

    by_method = {"rdpo": {"alpha": cfg.rdpo_alpha}, "dpop": {"lam": cfg.dpop_lambda},
                 "simpo": {"gamma": cfg.simpo_gamma}}
    values = {"beta": cfg.beta, "alpha": cfg.nll_alpha, **by_method.get(name, {})}
    return {k: v for k, v in values.items() if k in get_method(name).defaults}


# ------------------------------------------------------------------------------------------------- data
def _pair_texts(cfg: Config) -> tuple[list, list]:
    """(training triples, held-out triples) of (prompt, chosen, rejected) strings."""
    import random

    from rftlab.data import preference_files, sentiment

    if not cfg.data_path:
        n = cfg.n_train + cfg.n_eval + cfg.n_probe
        rows = [(e.prompt, e.chosen, e.rejected) for e in sentiment.make_examples(n, cfg.variant, cfg.seed)]
        return rows[: cfg.n_train], rows[cfg.n_train:]
    rows = [(p.prompt, p.chosen, p.rejected) for p in preference_files.load_preference_pairs(cfg.data_path)]
    if cfg.eval_data_path:
        held = [(p.prompt, p.chosen, p.rejected)
                for p in preference_files.load_preference_pairs(cfg.eval_data_path, cfg.n_eval + cfg.n_probe, 42)]
    else:
        random.Random(cfg.seed).shuffle(rows)
        held, rows = rows[: cfg.n_eval + cfg.n_probe], rows[cfg.n_eval + cfg.n_probe:]
    train = rows[: cfg.n_train] if cfg.n_train else rows
    if not train or not held:
        raise RftlabError(f"{cfg.data_path} has too few pairs for n_eval + n_probe = {cfg.n_eval + cfg.n_probe} "
                         "held-out pairs and a training set")
    return train, held


def _encode(tokenizer, rows, cfg: Config):
    from rftlab.preference_train import encode_preferences

    prompts, chosen, rejected = zip(*rows, strict=True)
    return encode_preferences(tokenizer, prompts, chosen, rejected,
                              max_prompt_length=cfg.max_prompt_length or None)


def _edit_pairs(cfg: Config, tokenizer, held):
    """Edit pairs (token ids) from n-token responses: sentiment long-suffix chosen responses, or held-out ones."""
    from rftlab.data import edit_pairs, sentiment

    if cfg.data_path:
        prompts, responses = [r[0] for r in held], [r[1] for r in held]
    else:
        examples = sentiment.make_examples(cfg.edit_pairs * 2, "long-suffix", cfg.seed + 1)
        prompts, responses = [e.prompt for e in examples], [e.chosen for e in examples]
    # prompts as encode_preferences tokenizes them (special tokens, truncation), responses without specials
    enc = tokenizer(prompts, truncation=bool(cfg.max_prompt_length), max_length=cfg.max_prompt_length or None)
    enc = enc["input_ids"]
    res = tokenizer(responses, add_special_tokens=False)["input_ids"]
    keep = [i for i, r in enumerate(res) if len(r) >= cfg.edit_length][: cfg.edit_pairs]
    pool = {t for i in keep for t in res[i]}
    return edit_pairs.make_edit_pairs([enc[i] for i in keep], [res[i] for i in keep], cfg.edit_length,
                                      cfg.edit_ks, pool, cfg.seed)


# --------------------------------------------------------------------------------------- loss and steps
def _pair_loss(name: str, hp: dict, x_w, x_l, data, norms=None):
    """Per-pair loss (B,); for the normalised update the surrogate −(x_w/‖g_w‖ − x_l/‖g_l‖), norms constant."""
    from rftlab.preference import preference_loss

    if name == NORMALIZED:
        return -(x_w / norms[0] - x_l / norms[1])
    return preference_loss(name, x_w, x_l, data.ref_chosen, data.ref_rejected, data.len_chosen,
                           data.len_rejected, **hp)


def _norms(model, data, cfg: Config):
    import torch

    from rftlab.diagnostics import pair_gradient_stats

    stats = pair_gradient_stats(model, *data.token_lists(), params=cfg.grad_params, chunk_size=cfg.stats_chunk_size)
    return stats, tuple(torch.tensor(stats[c].to_numpy(), dtype=torch.float32, device=data.prompt_ids.device)
                        for c in ("norm_chosen", "norm_rejected"))


def _train_step(model, optimizer, batch, name: str, hp: dict, cfg: Config, run, total: int | None = None,
                bare=None) -> None:
    """One optimizer step on the batch mean of the per-pair loss, accumulated over micro-batches, gradient
    norm clipped to ``max_grad_norm`` (TRL's default 1.0); forwards under the run's autocast precision.

    On N processes ``batch`` is this process's shard of a ``total``-pair batch, ``model`` is DDP-wrapped and
    ``bare`` the model inside (per-pair gradient norms of the normalised update must not go through DDP): each
    process backpropagates N·Σ_{i in shard} ℓ_i / total, so DDP's average over processes is the gradient of
    Σ_i ℓ_i / total, the one-process loss. Micro-batches before the last skip DDP's all-reduce (gradients
    accumulate locally; the last backward reduces the sum)."""
    import contextlib

    import torch

    from rftlab import distributed as dist
    from rftlab import runtime
    from rftlab.preference_train import pair_token_logps

    total, bare, scale = total or len(batch), bare or model, dist.world_size()
    optimizer.zero_grad(set_to_none=True)
    micro = cfg.micro_batch_size or len(batch)
    starts = range(0, len(batch), micro)
    for start in starts:
        part = batch.select(range(start, min(start + micro, len(batch))))
        norms = _norms(bare, part, cfg)[1] if name == NORMALIZED else None
        with dist.no_sync(model) if start != starts[-1] else contextlib.nullcontext():
            with runtime.autocast(run.device, run.precision):
                lw, ll = pair_token_logps(model, part)
                loss = _pair_loss(name, hp, lw.sum(-1), ll.sum(-1), part, norms).sum() * scale / total
            loss.backward()
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    optimizer.step()


def _probe(model, probes, name: str, hp: dict, cfg: Config, eta: float):
    """Predicted and observed (Δx_w, Δx_l) of one η-step of SGD on each probe pair's own loss; a DataFrame."""
    import numpy as np
    import torch

    from rftlab.diagnostics import select_parameters
    from rftlab.preference import loss_partials, predicted_changes, threshold_coefficients
    from rftlab.preference_train import pair_token_logps

    stats, norms = _norms(model, probes, cfg)
    dev = probes.prompt_ids.device
    a, b, rho = (torch.tensor(stats[c].to_numpy(), device=dev) for c in ("norm_chosen", "norm_rejected", "inner"))
    a, b = a**2, b**2
    params = list(select_parameters(model, cfg.grad_params).values())
    obs, xs = [], []
    for i in range(len(probes)):
        one = probes.select([i])
        saved = [p.detach().clone() for p in params]
        lw, ll = pair_token_logps(model, one)
        before = (lw.sum().item(), ll.sum().item())
        xs.append(before)
        one_norms = (norms[0][i:i + 1], norms[1][i:i + 1])
        loss = _pair_loss(name, hp, lw.sum(-1), ll.sum(-1), one, one_norms).sum()
        grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        step = eta * min(1.0, cfg.max_grad_norm / norm) if cfg.max_grad_norm > 0 and norm > 0 else eta
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(step * g)
            lw, ll = pair_token_logps(model, one)
            obs.append((lw.sum().item() - before[0], ll.sum().item() - before[1], step))
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    obs_w, obs_l, steps = np.array(obs).T
    # partials at the x_w, x_l of the forward the step was taken from (DPOP's kink at x_w = x_w^ref makes the
    # loss's slope jump with rounding-level differences between batched and single-pair forwards)
    x_w, x_l = torch.tensor(xs, dtype=torch.float32, device=dev).T
    if name == NORMALIZED:  # L = −(x_w/‖g_w‖ − x_l/‖g_l‖): p = 1/‖g_w‖, q = 1/‖g_l‖
        d_w, d_l = -1.0 / norms[0], 1.0 / norms[1]
        c_w, c_l = norms[1] / norms[0], norms[0] / norms[1]
    else:
        args = (name, x_w, x_l, probes.ref_chosen, probes.ref_rejected, probes.len_chosen, probes.len_rejected)
        d_w, d_l = loss_partials(*args, **hp)
        c_w, c_l = threshold_coefficients(*args, **hp)
    step_t = torch.tensor(steps, dtype=torch.float64, device=dev)
    pred_w, pred_l = (step_t * v.double() for v in predicted_changes(d_w.double(), d_l.double(), a, b, rho))
    frame = stats.drop(columns=["regime"]).rename(columns={"logp_chosen": "x_w", "logp_rejected": "x_l"})
    frame = frame.assign(x_w=x_w.cpu().numpy(), x_l=x_l.cpu().numpy(), a=a.cpu().numpy(), b=b.cpu().numpy(),
                         rho=rho.cpu().numpy(),
                         d_w=d_w.cpu().numpy(), d_l=d_l.cpu().numpy(), c_chosen=c_w.cpu().numpy(),
                         c_rejected=c_l.cpu().numpy(), pred_dw=pred_w.cpu().numpy(),
                         pred_dl=pred_l.cpu().numpy(), obs_dw=obs_w, obs_dl=obs_l, step_size=steps)
    frame["pred_regime"] = _regime(frame.pred_dw < 0, frame.pred_dl > 0)
    frame["obs_regime"] = _regime(frame.obs_dw < 0, frame.obs_dl > 0)
    frame["match"] = ((np.sign(frame.pred_dw) == np.sign(frame.obs_dw))
                      & (np.sign(frame.pred_dl) == np.sign(frame.obs_dl)))
    return frame.assign(pair=np.arange(len(frame)))


def _probe_shared(model, probes, name: str, hp: dict, cfg: Config, eta: float):
    """:func:`_probe` on this process's share of the probe pairs, gathered in pair order on every process."""
    import numpy as np
    import pandas as pd

    from rftlab import distributed as dist

    mine = dist.shard(range(len(probes)))
    part = probes if len(mine) == len(probes) else probes.select(mine)
    frames = dist.gather([_probe(model, part, name, hp, cfg, eta)] if mine else [])
    return pd.concat(frames, ignore_index=True).assign(pair=np.arange(len(probes)))


def _regime(chosen_down, rejected_up):
    import numpy as np

    return np.select([chosen_down & rejected_up, chosen_down, rejected_up], ["both", "chosen_down", "rejected_up"],
                     "ideal")


# -------------------------------------------------------------------------------------------------- run
def _eval_row(model, eval_data, name: str, hp: dict, cfg: Config) -> dict:
    from rftlab.preference_train import evaluate

    summary, x_w, x_l = evaluate(model, eval_data, beta=cfg.beta)
    value = None if name == NORMALIZED else _pair_loss(name, hp, x_w, x_l, eval_data).mean().item()
    return {**summary, "loss_value": value}


def _probe_row(frame) -> dict:
    return {"grad/norm_chosen": frame.norm_chosen.mean(), "grad/norm_rejected": frame.norm_rejected.mean(),
            "grad/inner": frame.inner.mean(), "grad/cosine": frame.cosine.mean(),
            "regime/frac_chosen_down": (frame.pred_dw < 0).mean(),
            "regime/frac_rejected_up": (frame.pred_dl > 0).mean(),
            "regime/obs_frac_chosen_down": (frame.obs_dw < 0).mean(),
            "regime/obs_frac_rejected_up": (frame.obs_dl > 0).mean(), "regime/match": frame.match.mean()}


def regime_table(probes):
    """Per (optimizer, loss): predicted / observed regime shares over (pair, checkpoint), the match rate, and the
    probe (pair, checkpoint)s where this loss raises x_l while DPO (same optimizer, step, pair) lowers it."""
    import pandas as pd

    rows = []
    dpo = probes[probes.loss == "dpo"].set_index(["optimizer", "step", "pair"]).obs_dl
    for (opt, name), group in probes.groupby(["optimizer", "loss"], sort=False):
        row = {"optimizer": opt, "loss": name, "n": len(group), "match_rate": group.match.mean()}
        row |= {f"pred_{r}": (group.pred_regime == r).mean() for r in REGIMES}
        row |= {f"obs_{r}": (group.obs_regime == r).mean() for r in REGIMES}
        if len(dpo):
            other = dpo.reindex(pd.MultiIndex.from_frame(group[["optimizer", "step", "pair"]])).to_numpy()
            both = (group.obs_dl.to_numpy() > 0) & (other < 0)
            row["rejected_up_where_dpo_down"] = int(both.sum())
            row["rejected_up_where_dpo_down_step0"] = int(both[group.step.to_numpy() == 0].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def run(cfg: Config, run) -> None:
    import math

    import pandas as pd
    import torch

    from rftlab import distributed as dist
    from rftlab import models, runtime, sentiment_lm
    from rftlab.diagnostics import pair_gradient_stats
    from rftlab.preference_train import with_reference

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    dist.import_now(f"transformers.models.{cfg.model.arch}.modeling_{cfg.model.arch}")
    with dist.main_process_first():  # the main process pretrains and caches; the others load the cache
        tokenizer, model = sentiment_lm.pretrained_policy(run, cfg.model, cfg.pretrain, cfg.seed)
    train_rows, held_rows = _pair_texts(cfg)
    train, held = _encode(tokenizer, train_rows, cfg).to(run.device), _encode(tokenizer, held_rows, cfg).to(run.device)
    if cfg.sft.steps:
        with run.progress(cfg.sft.steps, "SFT on chosen") as bar:
            history = sentiment_lm.sft_chosen(model, train, cfg.sft, cfg.seed, bar)
        run.info(f"SFT loss {history[0]:.3f} → {sum(history[-20:]) / len(history[-20:]):.3f}")
    if cfg.model.lora_r:
        model = models.add_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, dropout=0.0,
                                target_modules=list(cfg.lora_targets) or None)
    model.train()
    # the starting policy is the reference of every loss (with LoRA: the adapter-free base, B = 0 at init)
    n_eval = min(cfg.n_eval, len(held))
    probe_idx = list(range(n_eval, n_eval + cfg.n_probe)) if len(held) >= n_eval + cfg.n_probe else \
        list(range(min(cfg.n_probe, len(held))))
    train = with_reference(model, train)
    eval_data = with_reference(model, held.select(list(range(n_eval))))
    probes = with_reference(model, held.select(probe_idx))

    edits = _edit_pairs(cfg, tokenizer, held_rows)
    if edits:
        mine = [edits[i] for i in dist.shard(range(len(edits)))]  # split between processes, gathered in order
        stats = pd.concat(dist.gather([pair_gradient_stats(
            model, [e.prompt for e in mine], [e.chosen for e in mine], [e.rejected for e in mine],
            params=cfg.grad_params, chunk_size=cfg.stats_chunk_size)] if mine else []), ignore_index=True)
        edit_table = stats.assign(k=[e.k for e in edits], shared_fraction=[e.shared_fraction for e in edits])
        run.write_table("edit_pairs", edit_table)
        kappa = edit_table.groupby("shared_fraction").cosine.mean()
        run.info("κ by shared fraction: " + ", ".join(f"{f:.2f}: {c:.3f}" for f, c in kappa.items()))

    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trained = dist.prepare(model, run.compile)  # steps go through this (DDP on N processes); measurements not
    steps = cfg.steps or math.ceil(len(train) / cfg.batch_size)
    eta = cfg.probe_lr or cfg.sgd_lr / cfg.batch_size
    eval_steps = {*range(0, steps, cfg.eval_every), steps}
    checkpoints = {*range(0, steps, cfg.probe_every), steps}
    combos = [(opt_name, name) for opt_name in cfg.optimizers for name in cfg.losses]
    saved = run.load_checkpoint()  # --resume: skip the (optimizer, loss) runs already finished
    tables = [pd.DataFrame(saved["probes"])] if saved else []
    done = saved["done"] if saved else 0
    with run.progress(len(combos) * steps, "margin losses") as bar:
        bar.advance(done * steps)
        for i, (opt_name, name) in enumerate(combos[done:], start=done):
            with torch.no_grad():  # every run starts from the same policy ...
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = (torch.optim.SGD(params, lr=cfg.sgd_lr) if opt_name == "sgd"
                         else torch.optim.AdamW(params, lr=cfg.adamw_lr, weight_decay=0.0))  # TRL: no decay
            hp = {} if name == NORMALIZED else _hparams(cfg, name)
            gen = torch.Generator().manual_seed(cfg.seed)  # ... and sees the same batches in the same order
            order: list[int] = []
            for step in range(steps + 1):
                if step in eval_steps:
                    row = {"optimizer": opt_name, "loss": name, "step": step,
                           **_eval_row(model, eval_data, name, hp, cfg)}
                    if step in checkpoints:
                        frame = _probe_shared(model, probes, name, hp, cfg, eta)
                        tables.append(frame.assign(optimizer=opt_name, loss=name, step=step))
                        row |= _probe_row(frame)
                    run.log(row)
                if step == steps:
                    break
                while len(order) < cfg.batch_size:  # epochs of seeded permutations
                    order += torch.randperm(len(train), generator=gen).tolist()
                idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
                _train_step(trained, optimizer, train.select(dist.shard(idx)), name, hp, cfg, run, total=len(idx),
                            bare=model)
                bar.advance()
            dist.check_in_sync(run, model, f"{opt_name}/{name}")
            so_far = pd.concat(tables, ignore_index=True)
            run.save_checkpoint({"done": i + 1, "probes": {c: so_far[c].tolist() for c in so_far}})
    probe_table = pd.concat(tables, ignore_index=True)
    run.write_table("probes", probe_table)
    regimes = regime_table(probe_table)
    run.write_table("regimes", regimes)
    for r in regimes.itertuples():
        extra = f", x_l ↑ where dpo ↓: {r.rejected_up_where_dpo_down}" if "dpo" in cfg.losses else ""
        run.info(f"{r.optimizer:5s} {r.loss:19s} match {r.match_rate:.1%}  predicted chosen↓ "
                 f"{r.pred_chosen_down + r.pred_both:.0%} rejected↑ {r.pred_rejected_up + r.pred_both:.0%}{extra}")


# ------------------------------------------------------------------------------------------------- plot
def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Rows 1–2 (SGD, AdamW): eval chosen / rejected log-prob and reward margin per loss (Fig. 2). Row 3: κ against
    the shared-token fraction of edit pairs; predicted vs observed regime shares per loss (SGD); match rates."""
    import numpy as np
    import pandas as pd

    from rftlab import plotting
    from rftlab.results import read_metrics, read_table

    metrics = pd.concat([read_metrics(r) for r in runs], ignore_index=True)
    regimes = pd.concat([read_table(r, "regimes") for r in runs], ignore_index=True)
    edits = [read_table(r, "edit_pairs") for r in runs if (r / "edit_pairs.parquet").exists()]
    losses = list(dict.fromkeys(metrics["loss"]))
    palette = [*[c for i, c in enumerate(_tab20()) if i % 2 == 0], *_tab20()[1::2]]
    colors = {name: ("black" if name == NORMALIZED else palette[i % len(palette)]) for i, name in enumerate(losses)}
    optimizers = list(dict.fromkeys(metrics["optimizer"]))
    fig, axes = plotting.figure(ncols=3, nrows=len(optimizers) + 1, width=4.4, height=3.2)
    columns = (("logps/chosen", "chosen log π(y_w|x)"), ("logps/rejected", "rejected log π(y_l|x)"),
               ("rewards/margins", "reward margin β(Δ_w − Δ_l)"))
    for row, opt in enumerate(optimizers):
        sub = metrics[metrics.optimizer == opt]
        for ax, (col, label) in zip(axes[row], columns, strict=True):
            for name in losses:
                curve = sub[sub.loss == name].groupby("step")[col].mean()
                key = name in ("dpo", NORMALIZED)  # drawn on top (R-DPO equals DPO on equal-length pairs)
                ax.plot(curve.index, curve.to_numpy(), color=colors[name], lw=2.0 if key else 1.2,
                        ls="--" if name == NORMALIZED else "-", label=name, zorder=3 if key else 2)
            ax.set(title=f"{opt.upper() if opt == 'sgd' else 'AdamW'}: {label}", xlabel="step", ylabel=label)
            spread = sub[col].abs()
            if spread.max() > 20 * max(spread[sub.step == 0].abs().max(), 1.0):  # a diverging curve: keep the rest
                ax.set_yscale("symlog", linthresh=10.0 if col.startswith("logps") else 1.0)
    axes[0][2].legend(loc="upper left", fontsize=6.5, ncol=2)
    kappa_ax, regime_ax, match_ax = axes[-1]
    if edits:
        edit = pd.concat(edits, ignore_index=True)
        per = edit.groupby("shared_fraction").cosine.agg(["mean", "std"]).reset_index()
        kappa_ax.errorbar(per.shared_fraction, per["mean"], yerr=per["std"], marker="o", capsize=3, color="#1f77b4")
        kappa_ax.axhline(0, color="black", lw=0.6)
    kappa_ax.set(title="κ = cos(g_w, g_l) at the start, edit pairs", xlabel="shared-token fraction (n − k)/n",
                 ylabel="mean κ over pairs (± std)", ylim=(-0.3, 1.05))
    first = regimes[regimes.optimizer == optimizers[0]].groupby("loss", sort=False).mean(numeric_only=True)
    first = first.reindex([n for n in losses if n in first.index])
    xs = np.arange(len(first))
    bars = (("pred", "chosen", -0.3, "#d62728", None), ("obs", "chosen", -0.1, "#f4a3a3", "//"),
            ("pred", "rejected", 0.1, "#ff7f0e", None), ("obs", "rejected", 0.3, "#ffd08a", "//"))
    for kind, side, dx, color, hatch in bars:
        share = first[f"{kind}_{side}_down" if side == "chosen" else f"{kind}_{side}_up"] + first[f"{kind}_both"]
        arrow = "↓" if side == "chosen" else "↑"
        regime_ax.bar(xs + dx, share, 0.2, color=color, hatch=hatch, edgecolor="white" if hatch is None else "grey",
                      label=f"{side} {arrow} ({'predicted' if kind == 'pred' else 'observed'})")
    regime_ax.set_xticks(xs, first.index, rotation=60, ha="right", fontsize=7)
    regime_ax.set(title=f"regimes on probe pairs ({optimizers[0]})", ylabel="share of (pair, checkpoint)",
                  ylim=(0, 1.4))
    regime_ax.legend(loc="upper left", fontsize=6.5, ncol=2)
    width = 0.8 / len(optimizers)
    for i, opt in enumerate(optimizers):
        rate = regimes[regimes.optimizer == opt].groupby("loss", sort=False).match_rate.mean().reindex(first.index)
        match_ax.bar(xs + (i - (len(optimizers) - 1) / 2) * width, rate, width, label=opt,
                     color=("#2ca02c", "#9467bd")[i % 2])
    match_ax.axhline(0.9, color="black", lw=0.8, ls=":")
    match_ax.set_xticks(xs, first.index, rotation=60, ha="right", fontsize=7)
    match_ax.set(title="predicted sign = observed sign (Δx_w and Δx_l)", ylabel="match rate", ylim=(0, 1.05))
    match_ax.legend(loc="lower left", fontsize=7)
    return [plotting.save(fig, out_dir, "margin_losses", fmt)]


def _tab20() -> list:
    import matplotlib

    return [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
