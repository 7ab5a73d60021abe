"""``rftlab diagnose pairs``: which of your preference pairs will a DPO-like loss push the wrong way? (Yuan et al. 2024)

For a pair (x, y_w, y_l) write x_w = log π_θ(y_w|x), x_l = log π_θ(y_l|x) (SUMMED response-token log-probs) and

    g_w = ∇θ x_w,  g_l = ∇θ x_l,  a = ‖g_w‖²,  b = ‖g_l‖²,  ρ = ⟨g_w, g_l⟩,  κ = ρ/√(ab).

A per-pair loss L(x_w, x_l) moves the two log-probs, under gradient flow, by dx_w ∝ p·a − q·ρ and
dx_l ∝ p·ρ − q·b with p = −∂L/∂x_w and q = ∂L/∂x_l (gradient entanglement, Yuan et al., arXiv 2410.13828). For
p, q > 0 the chosen log-prob FALLS iff ρ > c_chosen·a and the rejected one RISES iff ρ > c_rejected·b, with
(c_chosen, c_rejected) = (p/q, q/p) (``rftlab.preference.threshold_coefficients``): (1, 1) for DPO, length
ratios for IPO and SimPO, c_chosen > 1 > c_rejected for losses with an explicit term on the chosen (CPO, RPO,
DPOP). When q < 0 (IPO past its target margin) or p < 0 the inequalities flip; p = q = 0 (a satisfied hinge)
moves nothing, the "inactive" regime. The regimes are "ideal" (chosen up, rejected down), "chosen_down",
"rejected_up", "both" and "inactive"; ties (ρ within 1e-5 of the threshold, relative) count as crossing it, as in
``pair_gradient_stats``, so a pair with identical responses (ρ = a = b) reads "both" under DPO. These are
first-order predictions for a step on the pair's own loss at the model's current parameters.

Per pair this measures a, b, ρ, κ and the log-probs with ``rftlab.diagnostics.pair_gradient_stats`` (the
function the margin-losses and entanglement-sentiment experiments use: equal model and token ids give equal
numbers), in the parameter subset ``params``; the loss partials and thresholds at those log-probs (reference
log-probs from ``ref``, or the model itself: π = π_ref, the start of training); and text statistics of the two
responses' token ids (:func:`shared_fraction`, :func:`edit_distance`, :func:`shared_prefix`).

Tokenization follows ``rftlab.rl.sampling.encode_pairs`` (the preference trainer's): the prompt with the
tokenizer's special tokens, each response without them and, with ``add_eos`` (default, as TRL's DPOTrainer),
EOS appended, so the responses share at least that last token. The model needs a prompt token: an empty prompt
becomes the BOS id for causal models (EOS without one) and EOS for seq2seq ones. Conversational rows are
rendered with the tokenizer's chat template (``rftlab.data.preference_files``). With an adapter, the trainable
parameters, and so ``params=all``, are the adapter's. With a trained adapter, TRL's default reference is the base
model with the adapter disabled: pass the base as ``ref`` for that.

Writes ``pairs.parquet`` (one row per pair, METRICS), one metrics row of headline numbers and ``summary.md``.
Figures: κ vs the shared-token fraction coloured by regime; the regime map ρ/(c_chosen·a) vs ρ/(c_rejected·b).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rftlab.diagnose.inputs import check_path
from rftlab.errors import RftlabError

VERSION = 1

# rftlab.preference.REGIMES, repeated here so the module stays light at import (preference loads torch)
REGIMES = ("ideal", "chosen_down", "rejected_up", "both", "inactive")
REGIME_MEANING = {
    "ideal": "chosen rises, rejected falls",
    "chosen_down": "the chosen log-prob falls",
    "rejected_up": "the rejected log-prob rises",
    "both": "chosen falls and rejected rises",
    "inactive": "the loss exerts no force (p = q = 0)",
}
REGIME_COLORS = {"ideal": "#2ca02c", "chosen_down": "#d62728", "rejected_up": "#ff7f0e", "both": "#9467bd",
                 "inactive": "#7f7f7f"}
HPARAMS = ("beta", "alpha", "gamma", "lam", "sft_weight")  # every key of rftlab.preference.METHODS' defaults

METRICS = {
    "pairs.parquet": "one row per diagnosed pair, the columns below",
    "pair_id": "the pair's row in the source (0-based; with max_pairs, the rows of the seeded subset)",
    "prompt, chosen, rejected": "the texts as diagnosed (conversational rows rendered or flattened)",
    "len_prompt, len_chosen, len_rejected": "token counts (responses include the appended EOS and any truncation)",
    "shared_fraction": "LCS(y_w, y_l) / max(|y_w|, |y_l|) on the response token ids, EOS included (1 = "
    "identical)",
    "shared_prefix": "tokens at the start of both responses (identical per-token gradients in a causal model)",
    "edit_distance": "token-level Levenshtein distance between the responses",
    "norm_chosen, norm_rejected": "‖g_w‖ = √a, ‖g_l‖ = √b over the parameters `params` selects",
    "inner, cosine": "ρ = ⟨g_w, g_l⟩ and κ = ρ/(‖g_w‖‖g_l‖)",
    "rho_over_a, rho_over_b": "ρ/a and ρ/b (DPO's regime: the chosen falls iff ρ/a > 1)",
    "dpo_regime": "the regime under DPO (c = 1), pair_gradient_stats' `regime`",
    "logp_chosen, logp_rejected": "x_w, x_l: summed response log-probs under the model",
    "ref_logp_chosen, ref_logp_rejected": "the same under the reference (NaN for reference-free losses)",
    "d_w, d_l": "∂L/∂x_w, ∂L/∂x_l of the loss at these log-probs (p = −d_w, q = d_l)",
    "c_chosen, c_rejected": "thresholds p/q and q/p: chosen falls iff ρ > c_chosen·a, rejected rises iff "
    "ρ > c_rejected·b (for p, q > 0)",
    "rho_over_ca, rho_over_cb": "ρ/(c_chosen·a), ρ/(c_rejected·b): above 1 = at risk (for p, q > 0)",
    "pred_dw, pred_dl": "first-order change of x_w, x_l per unit SGD step on the pair's loss: −d_w·a − d_l·ρ, "
    "−d_w·ρ − d_l·b",
    "chosen_at_risk, rejected_at_risk": "the loss lowers x_w / raises x_l (ties count)",
    "regime": "ideal, chosen_down, rejected_up, both or inactive under `loss`",
    "metrics (one row)": "n_pairs, frac_<regime>, frac_chosen_at_risk, frac_rejected_at_risk, cosine_mean, "
    "cosine_median, shared_fraction_mean, cosine_shared_spearman, method ('fast' or 'exact')",
}


@dataclass(frozen=True)
class Config:
    model: str = ""  # hub name in the local cache, a save_pretrained folder, or a PEFT adapter folder
    adapter: str = ""  # PEFT adapter folder applied to the model ("" = none)
    ref: str = ""  # reference model of the loss's reference term ("" = the model itself: π = π_ref)
    pairs: str = ""  # .jsonl/.json/.csv/.parquet, a datasets folder or a cached hub data set (prompt, chosen, rejected)
    loss: str = "dpo"  # a rftlab.preference loss: dpo, ipo, slic, rdpo, simpo, dpop, cpo, rpo, rrhf, orpo
    beta: float = 0.1  # β of every loss that has one (rrhf and orpo have none)
    alpha: float = -1.0  # α of rdpo (length), cpo / rpo / rrhf (NLL weight); < 0 = the loss's default
    gamma: float = -1.0  # γ of simpo (target margin); < 0 = the loss's default (0.5)
    lam: float = -1.0  # λ of dpop (penalty) and orpo (odds-ratio weight); < 0 = the loss's default
    sft_weight: float = -1.0  # SFT weight of slic; < 0 = the loss's default (0)
    params: Literal["all", "last", "embeddings", "lora"] = "all"  # θ of g_w, g_l (with an adapter, all = lora)
    max_pairs: int = 0  # diagnose a seeded random subset of N pairs, in file order (0 = all)
    method: Literal["auto", "fast", "exact"] = "auto"  # gradient method; auto: fast (causal), exact (seq2seq)
    chunk_size: int = 32  # sequences per pair_gradient_stats call (chunk_size / 2 pairs)
    add_eos: bool = True  # append EOS to each response, as TRL's DPOTrainer does
    max_length: int = 0  # cut responses to this many tokens, EOS included (0 = no cut)
    max_prompt_length: int = 0  # cut prompts to this many tokens, on the tokenizer's truncation_side (0 = no cut)
    seed: int = 0  # seeds the max_pairs subset
    threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        from rftlab.preference import get_method

        method = get_method(self.loss)  # RftlabError listing the known losses for an unknown name
        for key in HPARAMS[1:]:
            if getattr(self, key) >= 0 and key not in method.defaults:
                raise ValueError(f"{key} does not apply to loss {method.name!r}, which takes "
                                 f"{', '.join(method.defaults)}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.chunk_size < 2:
            raise ValueError("chunk_size must be at least 2 (one chosen and one rejected sequence)")
        if self.max_pairs < 0 or self.max_length < 0 or self.max_prompt_length < 0:
            raise ValueError("max_pairs, max_length and max_prompt_length must be ≥ 0 (0 = all / no cut)")
        if self.max_length == 1 and self.add_eos:
            raise ValueError("max_length=1 with add_eos leaves only the EOS token of each response")


def hparams(cfg: Config) -> dict[str, float]:
    """The loss's hyperparameters: β where it has one, the others where set (≥ 0), else its defaults."""
    from rftlab.preference import get_method

    method = get_method(cfg.loss)
    chosen = {k: float(getattr(cfg, k)) for k in HPARAMS if k in method.defaults and (k == "beta" or
                                                                                     getattr(cfg, k) >= 0)}
    return {**method.defaults, **chosen}


def uses_reference(loss: str) -> bool:
    """Whether the loss has a reference term: the reference-anchored ones, and slic (TRL's hinge) when given one."""
    from rftlab.preference import get_method

    method = get_method(loss)
    return method.needs_ref or "^ref" in method.formula  # slic: optional reference, "x_w^ref" in its formula


# ---------------------------------------------------------------------------------------------- check
def check_processes(cfg: Config, n: int) -> None:
    """Any number of processes: the pairs' gradient statistics are split between them in chunks and gathered in
    order (each pair's numbers do not depend on the other pairs of its chunk)."""


def check(cfg: Config) -> None:
    """Before a run folder exists: --model and --pairs are given, local paths exist."""
    for flag, value in (("--model", cfg.model), ("--pairs", cfg.pairs)):
        if not value:
            raise RftlabError(f"diagnose pairs needs {flag} (see `rftlab diagnose pairs --help`).")
    check_path("pairs", cfg.pairs)
    check_path("model", cfg.model, folder=True)
    for what, value in (("adapter", cfg.adapter), ("reference model", cfg.ref)):
        if value:
            check_path(what, value, folder=True)


# ------------------------------------------------------------------------------------ token statistics
def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences; O(|a|·|b|) in |a| numpy row updates.

    Row recurrence L_i[j] = max(L_{i−1}[j], L_i[j−1], [a_i = b_j]·(L_{i−1}[j−1] + 1)) unrolled into a running
    maximum: L_i[j] = max_{k ≤ j} max(L_{i−1}[k], [a_i = b_k]·(L_{i−1}[k−1] + 1)).
    """
    import numpy as np

    if len(a) == 0 or len(b) == 0:
        return 0
    y = np.asarray(list(b))
    row = np.zeros(len(y) + 1, dtype=np.int64)
    for t in a:
        step = np.maximum(row[1:], np.where(y == t, row[:-1] + 1, 0))
        row[1:] = np.maximum.accumulate(step)
    return int(row[-1])


def shared_fraction(a: Sequence, b: Sequence) -> float:
    """LCS(a, b) / max(|a|, |b|): the share of the longer response's tokens that the other one holds in the same
    order (1 = identical, 0 = no token in common; 1 for two empty responses).

    On :mod:`rftlab.data.edit_pairs` pairs (equal length n, k substituted positions) this is at least their
    positional (n − k)/n, and equal unless a substituted token happens to match a token at another position.
    """
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else lcs_length(a, b) / longest


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Token-level Levenshtein distance (unit-cost insertions, deletions, substitutions); |a| numpy row updates.

    D_i[j] = min(D_{i−1}[j] + 1, D_i[j−1] + 1, D_{i−1}[j−1] + [a_i ≠ b_j]) unrolled as
    D_i[j] = j + min_{k ≤ j} (t_k − k) with t_0 = i, t_k = min(D_{i−1}[k] + 1, D_{i−1}[k−1] + [a_i ≠ b_k]).
    """
    import numpy as np

    if len(a) == 0 or len(b) == 0:
        return max(len(a), len(b))
    y = np.asarray(list(b))
    cols = np.arange(len(y) + 1)
    row = cols.copy()
    for i, t in enumerate(a, start=1):
        step = np.empty_like(row)
        step[0] = i
        step[1:] = np.minimum(row[1:] + 1, row[:-1] + (y != t))
        row = np.minimum.accumulate(step - cols) + cols
    return int(row[-1])


def shared_prefix(a: Sequence, b: Sequence) -> int:
    """Number of leading tokens the two responses share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------- regimes
# ------------------------------------------------------------------------------------------ tokenizing
def load_pairs(cfg: Config, tokenizer) -> tuple[list[int], list]:
    """(source row numbers, PreferencePair list) of the pairs to diagnose: every row of ``cfg.pairs``, or the
    seeded subset of ``max_pairs`` that ``rftlab.data.preference_files.load_preference_pairs`` keeps."""
    from rftlab.data.preference_files import load_preference_pairs

    pairs = load_preference_pairs(cfg.pairs, n=cfg.max_pairs, seed=cfg.seed, tokenizer=tokenizer)
    return [p.row for p in pairs], pairs


def encode(tokenizer, pairs: list, *, seq2seq: bool, add_eos: bool = True, max_length: int = 0,
           max_prompt_length: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids (prompts, chosen, rejected), B unpadded lists each, as ``rftlab.rl.sampling.encode_pairs``
    tokenizes pairs for preference training (module docstring). An empty prompt becomes [BOS] for a causal model
    (else [EOS]) and [EOS] for a seq2seq one (what T5's tokenizer makes of "")."""
    from rftlab.preference_train import PreferenceData
    from rftlab.rl.sampling import encode_pairs

    prompts = [p.prompt for p in pairs]
    kw = {"seq2seq": seq2seq, "add_eos": add_eos, "max_prompt_length": max_prompt_length or None,
          "max_response_length": max_length or None}
    p_ids, p_mask, w_ids, w_mask = encode_pairs(tokenizer, prompts, [p.chosen for p in pairs], **kw)
    _, _, l_ids, l_mask = encode_pairs(tokenizer, prompts, [p.rejected for p in pairs], **kw)
    x, y_w, y_l = PreferenceData(p_ids, p_mask, w_ids, w_mask, l_ids, l_mask).token_lists()
    # the model needs an input token: a causal model continues from it, T5's encoder cannot attend to nothing
    bos = tokenizer.bos_token_id
    start = tokenizer.eos_token_id if seq2seq or bos is None else bos
    x = [ids or [start] for ids in x]
    empty = next((i for i, (w, l) in enumerate(zip(y_w, y_l, strict=True)) if not w or not l), None)
    if empty is not None:
        raise RftlabError(f"pair {empty} has an empty response after tokenization; set add_eos=true or drop it.")
    return x, y_w, y_l


# ------------------------------------------------------------------------------------------------ run
def run(cfg: Config, run) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from rftlab import runtime
    from rftlab.diagnose.inputs import load_model
    from rftlab.diagnostics import select_parameters
    from rftlab.models import is_seq2seq
    from rftlab.preference import classify_regimes, loss_partials, predicted_changes, threshold_coefficients
    from rftlab.results import atomic_write_text

    runtime.set_threads(cfg.threads)
    runtime.seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.adapter, device=run.device)
    if cfg.params == "lora" and not any("lora_" in n for n, p in model.named_parameters() if p.requires_grad):
        raise RftlabError(f"params=lora needs a PEFT adapter, and {cfg.model!r} has none: pass --adapter DIR (or "
                          "the adapter folder as --model), or choose params=all/last/embeddings.")
    n_params = sum(p.numel() for p in select_parameters(model, cfg.params).values())
    rows, pairs = load_pairs(cfg, tokenizer)
    seq2seq = is_seq2seq(model)
    prompts, chosen, rejected = encode(tokenizer, pairs, seq2seq=seq2seq, add_eos=cfg.add_eos,
                                       max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    method = cfg.method if cfg.method != "auto" else "exact" if seq2seq else "fast"
    stats, method = _gradient_stats(model, prompts, chosen, rejected, cfg, method, run)

    name, hp = cfg.loss, hparams(cfg)
    x_w, x_l = (torch.tensor(stats[c].to_numpy(), dtype=torch.float64) for c in ("logp_chosen", "logp_rejected"))
    ref_w = ref_l = None
    if uses_reference(name):
        if cfg.ref:
            ref_w, ref_l = _reference_logps(cfg.ref, tokenizer, prompts, chosen, rejected, cfg, run.device)
        else:  # π_ref = π: the state at the start of training
            ref_w, ref_l = x_w.clone(), x_l.clone()
    elif cfg.ref:
        run.info(f"loss {name} has no reference term: --ref {cfg.ref} is not used.")
    len_w = torch.tensor([len(y) for y in chosen], dtype=torch.float64)
    len_l = torch.tensor([len(y) for y in rejected], dtype=torch.float64)
    args = (name, x_w, x_l, ref_w, ref_l, len_w, len_l)
    d_w, d_l = loss_partials(*args, **hp)
    c_w, c_l = threshold_coefficients(*args, **hp)
    a, b = stats.norm_chosen.to_numpy() ** 2, stats.norm_rejected.to_numpy() ** 2
    rho = stats.inner.to_numpy()
    pred_w, pred_l = predicted_changes(d_w.numpy(), d_l.numpy(), a, b, rho)
    regime = classify_regimes(a, b, rho, -d_w.numpy(), d_l.numpy())
    nan = np.full(len(pairs), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        table = pd.DataFrame({
            "pair_id": rows, "prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs], "len_prompt": [len(x) for x in prompts],
            "len_chosen": len_w.numpy().astype(int), "len_rejected": len_l.numpy().astype(int),
            "shared_fraction": [shared_fraction(w, l) for w, l in zip(chosen, rejected, strict=True)],
            "shared_prefix": [shared_prefix(w, l) for w, l in zip(chosen, rejected, strict=True)],
            "edit_distance": [edit_distance(w, l) for w, l in zip(chosen, rejected, strict=True)],
            **{c: stats[c].to_numpy() for c in ("norm_chosen", "norm_rejected", "inner", "cosine", "rho_over_a",
                                                "rho_over_b")},
            "dpo_regime": stats.regime.to_numpy(), "logp_chosen": x_w.numpy(), "logp_rejected": x_l.numpy(),
            "ref_logp_chosen": nan if ref_w is None else ref_w.numpy(),
            "ref_logp_rejected": nan if ref_l is None else ref_l.numpy(),
            "d_w": d_w.numpy(), "d_l": d_l.numpy(), "c_chosen": c_w.numpy(), "c_rejected": c_l.numpy(),
            "rho_over_ca": rho / (c_w.numpy() * a), "rho_over_cb": rho / (c_l.numpy() * b),
            "pred_dw": np.asarray(pred_w), "pred_dl": np.asarray(pred_l),
            "chosen_at_risk": np.isin(regime, ["chosen_down", "both"]),
            "rejected_at_risk": np.isin(regime, ["rejected_up", "both"]), "regime": regime,
        })
    run.write_table("pairs", table)
    headline = summarize(table, method)
    run.log(headline)
    context = {"model": cfg.model + (f" + {cfg.adapter}" if cfg.adapter else ""), "hparams": hp,
               "reference": (cfg.ref or "the model itself (π = π_ref)") if uses_reference(name) else None,
               "n_params": n_params, "method": method}
    if run.is_main:  # the others hold the same table and write nothing
        atomic_write_text(run.path / "summary.md", summary_markdown(cfg, table, headline, context))
    run.info(f"{len(table)} pairs, loss {name}: chosen falls on {headline['frac_chosen_at_risk']:.0%}, rejected "
             f"rises on {headline['frac_rejected_at_risk']:.0%} (both {headline['frac_both']:.0%}); mean "
             f"cos(g_w, g_l) {headline['cosine_mean']:.3f}")


def _gradient_stats(model, prompts, chosen, rejected, cfg: Config, method: str, run):
    """pair_gradient_stats in chunks of ``chunk_size // 2`` pairs (one internal chunk per call: a progress step
    each), shortest pairs first so a chunk pads little, rows returned in input order. Returns (frame, method).

    ``method="auto"`` picks "fast" for causal models; where fast has no rule for a selected parameter's module
    (a module type with no rule, under params=all) it says so and runs "exact" instead."""
    import numpy as np
    import pandas as pd

    from rftlab import distributed as dist
    from rftlab.diagnostics import pair_gradient_stats

    n, per_call = len(prompts), cfg.chunk_size // 2
    order = np.argsort([len(x) + max(len(w), len(l)) for x, w, l in zip(prompts, chosen, rejected, strict=True)],
                       kind="stable")
    parts, no_fast_rule = [], None
    try:
        with run.progress(n, f"pair gradients ({method})") as bar:
            for start in dist.shard(range(0, n, per_call)):  # several processes: each takes its share of chunks
                idx = order[start:start + per_call]
                parts.append(pair_gradient_stats(model, [prompts[i] for i in idx], [chosen[i] for i in idx],
                                                 [rejected[i] for i in idx], params=cfg.params, method=method,
                                                 chunk_size=cfg.chunk_size))
                bar.advance(len(idx))
    except RftlabError as err:
        if cfg.method != "auto" or method != "fast" or "method='fast'" not in str(err):
            raise
        no_fast_rule = str(err)
    # every process takes the same turn, also one whose share of the chunks was empty
    reasons = [reason for reason in dist.gather([no_fast_rule]) if reason]
    if reasons:
        run.info(f"{reasons[0]} Running method='exact' (one backward per response).")
        return _gradient_stats(model, prompts, chosen, rejected, cfg, "exact", run)
    frame = pd.concat(dist.gather(parts), ignore_index=True)  # chunks in order, whichever process measured them
    frame.index = order
    return frame.sort_index().reset_index(drop=True), method


def _reference_logps(ref: str, tokenizer, prompts, chosen, rejected, cfg: Config, device: str):
    """Summed log π_ref(y|x) of the chosen and rejected responses, (B,) float64 tensors each, without gradient;
    padded as pair_gradient_stats pads, in chunks of ``chunk_size`` sequences (split between processes)."""
    import torch

    from rftlab import distributed as dist
    from rftlab.diagnose.inputs import load_model
    from rftlab.diagnostics import _pad_batch
    from rftlab.models import is_seq2seq, unwrap
    from rftlab.rl.sampling import response_logprobs

    model, ref_tokenizer = load_model(ref, device=device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RftlabError(f"reference model {ref!r} has a different tokenizer than {cfg.model!r}; the reference "
                          "must share the policy's vocabulary.")
    pad = unwrap(model).config.pad_token_id
    seq2seq, model_device = is_seq2seq(model), next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for responses in (chosen, rejected):
            parts = []
            for start in dist.shard(range(0, len(prompts), cfg.chunk_size)):
                part = slice(start, start + cfg.chunk_size)
                batch = _pad_batch(prompts[part], responses[part], 0 if pad is None else int(pad), seq2seq,
                                   model_device)
                parts.append(response_logprobs(model, *batch).sum(-1).double().cpu())
            out.append(torch.cat(dist.gather(parts)))
    return out[0], out[1]


# -------------------------------------------------------------------------------------------- summary
def summarize(table, method: str) -> dict:
    """The headline numbers of one diagnosis (also the single metrics row)."""
    from scipy.stats import spearmanr

    out = {"n_pairs": len(table), "method": method}
    for r in REGIMES:
        out[f"frac_{r}"] = float((table.regime == r).mean())
    ok = table[["cosine", "shared_fraction"]].dropna()
    varies = len(ok) > 2 and ok.cosine.nunique() > 1 and ok.shared_fraction.nunique() > 1
    out.update(frac_chosen_at_risk=float(table.chosen_at_risk.mean()),
               frac_rejected_at_risk=float(table.rejected_at_risk.mean()),
               cosine_mean=float(table.cosine.mean()), cosine_median=float(table.cosine.median()),
               shared_fraction_mean=float(table.shared_fraction.mean()),
               cosine_shared_spearman=float(spearmanr(ok.shared_fraction, ok.cosine).statistic) if varies
               else float("nan"))
    return out


def _clip(text: str, n: int = 48) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def summary_markdown(cfg: Config, table, headline: dict, context: dict) -> str:
    """The findings as markdown: setup, regime shares, cosine vs shared tokens, the pairs most at risk, and
    what the regimes mean."""
    hp = ", ".join(f"{k} = {v:g}" for k, v in context["hparams"].items()) or "no hyperparameters"
    ref = f"reference: {context['reference']}" if context["reference"] else "no reference term"
    lines = [f"# Gradient entanglement of `{context['model']}` on `{cfg.pairs}`", "",
             f"{len(table)} pairs, loss `{cfg.loss}` ({hp}; {ref}); gradients over params = `{cfg.params}` "
             f"({context['n_params']:,} parameters, method {context['method']}).", "",
             "| regime | what the loss does to the pair | pairs | share |", "|---|---|---|---|"]
    for r in REGIMES:
        count = int((table.regime == r).sum())
        if count or r != "inactive":
            lines.append(f"| {r} | {REGIME_MEANING[r]} | {count} | {headline[f'frac_{r}']:.1%} |")
    n_risk = int((table.chosen_at_risk | table.rejected_at_risk).sum())
    rho_s = headline["cosine_shared_spearman"]
    lines += ["", f"**{n_risk} pair{'s' * (n_risk != 1)} ({n_risk / len(table):.1%}) at risk: a step on each "
              f"pair's own `{cfg.loss}` loss lowers its chosen log-prob on {headline['frac_chosen_at_risk']:.1%} of "
              f"pairs and raises its rejected one on {headline['frac_rejected_at_risk']:.1%}.**", "",
              f"cos(g_w, g_l): mean {headline['cosine_mean']:.3f}, median {headline['cosine_median']:.3f}. "
              f"Shared-token fraction of the responses: mean {headline['shared_fraction_mean']:.2f}; Spearman "
              f"correlation of the cosine with it: " + (f"{rho_s:.2f}." if rho_s == rho_s else "undefined "
                                                          "(constant values)."), "",
              "A margin loss moves x_w = log π(y_w|x) by ∝ p·a − q·ρ and x_l by ∝ p·ρ − q·b (a = ‖g_w‖², b = ‖g_l‖², "
              "ρ = ⟨g_w, g_l⟩, p = −∂L/∂x_w, q = ∂L/∂x_l): when the two responses' gradients overlap (ρ > "
              "c_chosen·a or ρ > c_rejected·b) it pushes both log-probs the same way (Yuan et al. 2024, gradient "
              "entanglement). The overlap grows with the tokens the responses share, so near-identical pairs "
              "are where it bites: inspect the pairs below, and drop or edit pairs whose responses differ in only "
              "a few tokens. A loss with an explicit term on the chosen (cpo, rpo; dpop once the chosen is below "
              "its reference: c_chosen > 1 > c_rejected) protects the chosen at the price of letting the rejected "
              "rise more easily; re-run with `--loss` to compare. Yuan et al.'s pairwise-normalised update "
              "(g_w/‖g_w‖ − g_l/‖g_l‖) never lowers the chosen nor raises the rejected of the pair it is taken on, "
              "to first order. These are first-order predictions at the current parameters, per pair.",
              "", "## Pairs most at risk: highest ρ/(c_chosen·a)", "",
              "| pair_id | regime | cosine | ρ/(c·a) | ρ/(c·b) | shared | chosen | rejected |",
              "|---|---|---|---|---|---|---|---|"]
    top = table.sort_values(["rho_over_ca", "rho_over_cb"], ascending=False, na_position="last").head(10)
    lines += [f"| {r.pair_id} | {r.regime} | {r.cosine:.3f} | {r.rho_over_ca:.3g} | {r.rho_over_cb:.3g} | "
              f"{r.shared_fraction:.2f} | {_clip(r.chosen)} | {_clip(r.rejected)} |" for r in top.itertuples()]
    lines += ["", "Per-pair numbers: `pairs.parquet` (`rftlab list diagnose-pairs` explains the columns).", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plot
def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """κ vs the shared-token fraction, and the regime map ρ/(c_chosen·a) vs ρ/(c_rejected·b), of runs[0]."""
    import json

    from rftlab.results import CONFIG_FILE, read_table

    table = read_table(runs[0], "pairs")
    loss = json.loads((runs[0] / CONFIG_FILE).read_text())["config"].get("loss", "dpo")
    return [_plot_cosine(table, loss, out_dir, fmt), _plot_regimes(table, loss, out_dir, fmt)]


def _legend_label(table, regime: str) -> str:
    return f"{regime} ({int((table.regime == regime).sum())})"


def _plot_cosine(table, loss: str, out_dir: Path, fmt: str) -> Path:
    from scipy.stats import spearmanr

    from rftlab import plotting

    fig, axes = plotting.figure(width=5.0, height=3.8)
    ax = axes[0][0]
    for r in REGIMES:
        part = table[table.regime == r]
        if len(part):
            ax.scatter(part.shared_fraction, part.cosine, s=14, alpha=0.75, linewidths=0, color=REGIME_COLORS[r],
                       label=_legend_label(table, r))
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(1, color="k", lw=0.6, ls=":")
    ok = table[["shared_fraction", "cosine"]].dropna()
    varies = len(ok) > 2 and ok.cosine.nunique() > 1 and ok.shared_fraction.nunique() > 1
    rho = f"Spearman {spearmanr(ok.shared_fraction, ok.cosine).statistic:.2f}" if varies else "no spread"
    ax.set(xlabel="shared-token fraction LCS(y_w, y_l) / max(|y_w|, |y_l|)", ylabel="cos(g_w, g_l)",
           xlim=(-0.03, 1.03), title=f"Gradient cosine vs shared tokens ({rho}, {len(table)} pairs)")
    ax.legend(loc="best", fontsize=7, title=f"regime under {loss}", title_fontsize=7)
    return plotting.save(fig, out_dir, "diagnose_pairs_cosine", fmt)


def _plot_regimes(table, loss: str, out_dir: Path, fmt: str) -> Path:
    import numpy as np

    from rftlab import plotting

    fig, axes = plotting.figure(width=5.0, height=4.2)
    ax = axes[0][0]
    finite = table[np.isfinite(table.rho_over_ca) & np.isfinite(table.rho_over_cb)]
    # with p, q > 0 the thresholds sit at 1 on both axes; where the loss pushes against its own margin (p or
    # q < 0) the rule flips: those pairs are drawn as crosses, coloured by their true regime
    flipped = (finite.d_w >= 0) | (finite.d_l <= 0) | (finite.c_chosen <= 0)
    for r in REGIMES:
        label = _legend_label(table, r)  # on the first group drawn of each regime
        for mask, marker in ((~flipped, "o"), (flipped, "x")):
            part = finite[(finite.regime == r) & mask]
            if len(part):
                ax.scatter(part.rho_over_ca, part.rho_over_cb, s=16 if marker == "o" else 22, alpha=0.75,
                           marker=marker, linewidths=0 if marker == "o" else 1.0, color=REGIME_COLORS[r],
                           label=label)
                label = None
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yscale("symlog", linthresh=0.1)
    limits = []
    for column in ("rho_over_ca", "rho_over_cb"):  # always show both sides of the threshold at 1
        values = finite[column].to_numpy()
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        limits.append((min(-0.2, 1.3 * lo), max(3.0, 1.5 * hi)))
    ax.set(xlim=limits[0], ylim=limits[1])
    ax.axvspan(1, limits[0][1], color=REGIME_COLORS["chosen_down"], alpha=0.06, lw=0)
    ax.axhspan(1, limits[1][1], color=REGIME_COLORS["rejected_up"], alpha=0.06, lw=0)
    ax.axvline(1, color="k", lw=0.8, ls="--")
    ax.axhline(1, color="k", lw=0.8, ls="--")
    if np.allclose(table.c_chosen, 1.0) and np.allclose(table.c_rejected, 1.0):  # DPO-like: c = 1
        names = ("ρ / a", "ρ / b")
    else:
        names = ("ρ / (c_chosen·a)", "ρ / (c_rejected·b)")
    ax.set(xlabel=f"{names[0]}: the chosen falls right of 1", ylabel=f"{names[1]}: the rejected rises above 1")
    share = float((table.chosen_at_risk | table.rejected_at_risk).mean())
    ax.set_title(f"{share:.0%} of {len(table)} pairs are pushed the wrong way by {loss}")
    dropped = len(table) - len(finite)
    extra = [f"{dropped} pairs with a zero gradient not shown"] if dropped else []
    if flipped.any():
        extra.append("×: p or q ≤ 0, the threshold rule flips")
    if extra:
        ax.text(0.01, 0.01, "; ".join(extra), transform=ax.transAxes, fontsize=7, va="bottom")
    ax.legend(loc="best", fontsize=7, title=f"regime under {loss}", title_fontsize=7)
    return plotting.save(fig, out_dir, "diagnose_pairs_regimes", fmt)
