"""Gradient-entanglement diagnostics: per-pair sequence-gradient norms and inner products (Yuan et al. 2024).

For a preference pair (x, y_w, y_l) write x_w = log π_θ(y_w|x) and x_l = log π_θ(y_l|x) (SUMMED response-token
log-probs) and

    g_w = ∇_θ x_w,  g_l = ∇_θ x_l,  a = ‖g_w‖²,  b = ‖g_l‖²,  ρ = ⟨g_w, g_l⟩,  κ = ρ/√(ab).

Under DPO's gradient flow dx_w ∝ a − ρ and dx_l ∝ ρ − b (``rftlab.preference.predicted_changes``), so the chosen
log-prob falls when ρ > a and the rejected one rises when ρ > b. :func:`pair_gradient_stats` measures these per
pair; :func:`token_gradient_cosines` resolves κ into per-token gradient cosines.

Inputs are token ids, not strings: ``prompts``, ``chosen``, ``rejected`` are lists of id lists (ragged). The
padded batch follows :func:`rftlab.models.response_forward_hidden`'s convention (causal models: left-padded
prompt, right-padded response; seq2seq: right-padded prompt) with the pad id ``model.config.pad_token_id`` (0
when unset). No EOS is appended: include it in the responses if it should count.

``params`` picks the parameter subset θ the gradients live in (only parameters with ``requires_grad``):

- ``"all"``: every trainable parameter;
- ``"last"``: the last transformer block and everything after it (final norm, an untied output head);
  a tied output head is the token embedding and belongs to ``"embeddings"``;
- ``"embeddings"``: every ``nn.Embedding`` (token and position embeddings; T5's relative-attention bias);
- ``"lora"``: parameters whose name contains ``lora_``;
- a callable ``name -> bool`` on the names of ``unwrap(model).named_parameters()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from rftlab.errors import RftlabError
from rftlab.models import is_seq2seq, response_forward_hidden, unwrap

__all__ = ["pair_gradient_stats", "select_parameters", "token_gradient_cosines"]

ParamSpec = Literal["all", "last", "embeddings", "lora"] | Callable[[str], bool]
TokenIds = Sequence[Sequence[int]]


# ------------------------------------------------------------------------------------------ parameters
def select_parameters(model: nn.Module, params: ParamSpec = "all") -> dict[str, nn.Parameter]:
    """The trainable parameters of ``unwrap(model)`` named by ``params`` (module docstring), name → parameter.

    Raises RftlabError when the selection is empty (e.g. ``"lora"`` on a model without adapters, or a selection
    of frozen parameters only).
    """
    lm = unwrap(model)
    named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    if callable(params):
        keep = params
    elif params == "all":
        def keep(name: str) -> bool:
            return True
    elif params == "lora":
        def keep(name: str) -> bool:
            return "lora_" in name
    elif params == "embeddings":
        emb = {id(p) for m in lm.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        by_name = {n for n, p in named if id(p) in emb}

        def keep(name: str) -> bool:
            return name in by_name
    elif params == "last":
        start = _last_block_prefix(lm)
        names = [n for n, _ in named]
        first = next((i for i, n in enumerate(names) if n.startswith(start)), len(names))
        tail = set(names[first:])

        def keep(name: str) -> bool:
            return name in tail
    else:
        raise RftlabError(f"params must be 'all', 'last', 'embeddings', 'lora' or a callable, got {params!r}.")
    chosen = {n: p for n, p in named if keep(n)}
    if not chosen:
        raise RftlabError(f"params={params!r} selects no trainable parameter of this model.")
    return chosen


def _last_block_prefix(lm: nn.Module) -> str:
    """Name prefix of the last block of the last non-empty ModuleList (GPT-2 ``transformer.h.N.``, T5 decoder)."""
    lists = [(n, m) for n, m in lm.named_modules() if isinstance(m, nn.ModuleList) and len(m) and n]
    if not lists:
        raise RftlabError("params='last': the model has no list of transformer blocks.")
    name, blocks = lists[-1]
    return f"{name}.{len(blocks) - 1}."


# --------------------------------------------------------------------------------------------- batching
def _pad_id(model: nn.Module) -> int:
    pad = unwrap(model).config.pad_token_id
    return 0 if pad is None else int(pad)


def _pad_batch(prompts: TokenIds, responses: TokenIds, pad: int, seq2seq: bool,
               device: torch.device) -> tuple[torch.Tensor, ...]:
    """Token-id lists → prompt_ids, prompt_mask (N, P) and response_ids, response_mask (N, T), long.

    Prompts are left-padded for causal models and right-padded for seq2seq; responses are right-padded.
    """
    if len(prompts) != len(responses):
        raise RftlabError(f"{len(prompts)} prompts but {len(responses)} responses.")
    if any(len(r) == 0 for r in responses):
        raise RftlabError("every response needs at least one token.")
    if not seq2seq and any(len(p) == 0 for p in prompts):
        raise RftlabError("causal models need at least one prompt token per pair (e.g. a BOS/EOS id).")
    n, width_p, width_r = len(prompts), max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.full((n, width_p), pad, dtype=torch.long)
    prompt_mask = torch.zeros(n, width_p, dtype=torch.long)
    response_ids = torch.full((n, width_r), pad, dtype=torch.long)
    response_mask = torch.zeros(n, width_r, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        cols = slice(0, len(p)) if seq2seq else slice(width_p - len(p), width_p)
        prompt_ids[i, cols] = torch.tensor(list(p), dtype=torch.long)
        prompt_mask[i, cols] = 1
        response_ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        response_mask[i, : len(r)] = 1
    return tuple(t.to(device) for t in (prompt_ids, prompt_mask, response_ids, response_mask))


def _token_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log π(y_t|x, y_<t), (N, T), 0 on padding; differentiable (as ``rftlab.rl.sampling.response_logprobs``)."""
    logits, _ = response_forward_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logits = logits.float()
    token_logp = logits.gather(-1, response_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)
    return torch.where(response_mask.bool(), token_logp, torch.zeros_like(token_logp))


class _SequenceLogp(nn.Module):
    """Wraps the language model so ``torch.func.functional_call`` can swap its parameters (names get ``lm.``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                response_mask: torch.Tensor) -> torch.Tensor:
        """(P,), (P,), (T,), (T,) for ONE sequence → log π(y|x), a scalar (vmap supplies the batch)."""
        batch = (t[None] for t in (prompt_ids, prompt_mask, response_ids, response_mask))
        return _token_logprobs(self.lm, *batch).sum()


# ------------------------------------------------------------------------------------------- statistics
def pair_gradient_stats(model: nn.Module, prompts: TokenIds, chosen: TokenIds, rejected: TokenIds,
                        params: ParamSpec = "all", method: Literal["fast", "exact"] = "fast",
                        chunk_size: int = 16, rtol: float = 1e-5):
    """Per-pair gradient-entanglement statistics of B preference pairs, as a pandas DataFrame with B rows.

    prompts, chosen, rejected: B token-id lists each (ragged). With g_w = ∇_θ log π(y_w|x) and
    g_l = ∇_θ log π(y_l|x) over the parameters ``params`` selects (module docstring), the columns are

    - ``norm_chosen`` ‖g_w‖ = √a, ``norm_rejected`` ‖g_l‖ = √b, ``inner`` ρ = ⟨g_w, g_l⟩,
      ``cosine`` κ = ρ/(‖g_w‖‖g_l‖), ``rho_over_a`` ρ/a, ``rho_over_b`` ρ/b (nan where a norm is 0);
    - ``regime``: DPO's outcome under gradient flow — "ideal" (chosen rises, rejected falls), "chosen_down"
      (ρ > a: the chosen log-prob falls), "rejected_up" (ρ > b: the rejected one rises) or "both". Ties within
      relative ``rtol`` count as exceeding (ρ ≥ a·(1 − rtol)), so identical responses (ρ = a = b, the log-probs
      cannot move apart) read "both";
    - ``logp_chosen`` x_w, ``logp_rejected`` x_l (summed response-token log-probs, float).

    ``method="exact"``: the oracle, a Python loop with one unpadded forward and one ``torch.autograd.grad`` per
    response (2 per pair), then dot products of the flattened gradients. ``method="fast"``: ``torch.func`` —
    ``vmap(grad(functional_call(...)))`` over the padded 2B sequences, ``chunk_size`` sequences (chunk_size // 2
    pairs, chosen and rejected together) per call; per-example gradients (chunk, *param.shape) are reduced to
    a, b, ρ with batched products per parameter tensor and never stored beyond the chunk. Memory is about
    chunk_size × (#selected parameters) floats plus vmap's activations. vmap needs eager attention (sdpa with a
    padding mask is data-dependent), so the model's ``config._attn_implementation`` is set to "eager" for the
    call and restored after. ``fast`` supports causal models only (RftlabError for seq2seq: T5's encoder mask
    is built with a data-dependent check that vmap refuses); ``exact`` takes both. Both methods run the model
    in eval mode (dropout off) and restore its mode; products are accumulated in float64.
    """
    import pandas as pd

    if not (len(prompts) == len(chosen) == len(rejected)):
        raise RftlabError(f"got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses.")
    if method not in ("fast", "exact"):
        raise RftlabError(f"method must be 'fast' or 'exact', got {method!r}.")
    if chunk_size < 2:
        raise RftlabError(f"chunk_size must be at least 2 (one chosen + one rejected sequence), got {chunk_size}.")
    if method == "fast" and is_seq2seq(model):
        raise RftlabError("method='fast' supports causal models only: under vmap, transformers' encoder mask checks "
                          "padding_mask.all() (data-dependent); use method='exact' for seq2seq (T5) models.")
    selected = select_parameters(model, params)
    was_training = model.training
    model.eval()
    try:
        if method == "exact":
            a, b, rho, x_w, x_l = _stats_exact(model, prompts, chosen, rejected, selected)
        else:
            a, b, rho, x_w, x_l = _stats_fast(model, prompts, chosen, rejected, selected, chunk_size // 2)
    finally:
        model.train(was_training)
    a, b, rho = (t.cpu().numpy() for t in (a, b, rho))
    with np.errstate(divide="ignore", invalid="ignore"):
        frame = pd.DataFrame({
            "norm_chosen": np.sqrt(a), "norm_rejected": np.sqrt(b), "inner": rho,
            "cosine": rho / np.sqrt(a * b), "rho_over_a": rho / a, "rho_over_b": rho / b,
        })
    chosen_down = rho >= a * (1 - rtol)
    rejected_up = rho >= b * (1 - rtol)
    frame["regime"] = np.select([chosen_down & rejected_up, chosen_down, rejected_up], ["both", "chosen_down",
                                                                                          "rejected_up"], "ideal")
    frame["logp_chosen"] = x_w.cpu().double().numpy()
    frame["logp_rejected"] = x_l.cpu().double().numpy()
    return frame


def _flatten(params: list[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Concatenate per-parameter gradients into one float64 vector, (Σ numel,); unused parameters give zeros."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                      for p, g in zip(params, grads, strict=True)])


def _stats_exact(model: nn.Module, prompts: TokenIds, chosen: TokenIds, rejected: TokenIds,
                 selected: dict[str, nn.Parameter]) -> tuple[torch.Tensor, ...]:
    """Oracle: per response one unpadded forward and one autograd.grad; returns a, b, ρ, x_w, x_l, each (B,)."""
    params = list(selected.values())
    device = params[0].device
    pad, seq2seq = _pad_id(model), is_seq2seq(model)

    def flat_grad(prompt: Sequence[int], response: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _pad_batch([prompt], [response], pad, seq2seq, device)
        logp = _token_logprobs(model, *batch).sum()
        grads = torch.autograd.grad(logp, params, allow_unused=True)
        return _flatten(params, grads), logp.detach()

    rows = []
    for x, y_w, y_l in zip(prompts, chosen, rejected, strict=True):
        g_w, x_w = flat_grad(x, y_w)
        g_l, x_l = flat_grad(x, y_l)
        rows.append(torch.stack([g_w @ g_w, g_l @ g_l, g_w @ g_l, x_w.double(), x_l.double()]))
    return tuple(torch.stack(rows).T)


def _stats_fast(model: nn.Module, prompts: TokenIds, chosen: TokenIds, rejected: TokenIds,
                selected: dict[str, nn.Parameter], pairs_per_chunk: int) -> tuple[torch.Tensor, ...]:
    """torch.func: vmap(grad) over chunks of pairs (chosen rows then rejected rows); a, b, ρ, x_w, x_l, (B,)."""
    from torch.func import functional_call, grad, vmap

    lm = unwrap(model)
    device = next(iter(selected.values())).device
    n = len(prompts)
    batch = _pad_batch(list(prompts) * 2, list(chosen) + list(rejected), _pad_id(model), is_seq2seq(model), device)
    wrapper = _SequenceLogp(lm)
    theta = {f"lm.{k}": v.detach() for k, v in selected.items()}

    def logp(theta: dict[str, torch.Tensor], *row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = functional_call(wrapper, theta, row)
        return value, value

    per_example = vmap(grad(logp, has_aux=True), in_dims=(None, 0, 0, 0, 0))
    config = lm.config
    saved = getattr(config, "_attn_implementation", None)
    out = []
    try:
        config._attn_implementation = "eager"
        for start in range(0, n, pairs_per_chunk):
            idx = torch.arange(start, min(start + pairs_per_chunk, n), device=device)
            rows = torch.cat([idx, idx + n])
            with torch.no_grad():  # func.grad ignores it; it keeps unselected parameters from building a graph
                grads, values = per_example(theta, *(t[rows] for t in batch))
            c = len(idx)
            acc = torch.zeros(3, c, dtype=torch.float64, device=device)
            for g in grads.values():
                g = g.reshape(2 * c, -1).double()
                g_w, g_l = g[:c], g[c:]
                acc += torch.stack([(g_w * g_w).sum(-1), (g_l * g_l).sum(-1), (g_w * g_l).sum(-1)])
            out.append(torch.cat([acc, values.detach().double().view(2, c)]))
    finally:
        config._attn_implementation = saved
    return tuple(torch.cat(out, dim=1))


def token_gradient_cosines(model: nn.Module, prompt: Sequence[int], chosen: Sequence[int],
                           rejected: Sequence[int], params: ParamSpec = "all") -> np.ndarray:
    """Cosines between per-token gradients of the two responses to one prompt, a (T_w, T_l) numpy array.

    Entry [t, s] = cos(∇_θ log π(y_w,t|x, y_w,<t), ∇_θ log π(y_l,s|x, y_l,<s)), over the ``params`` selection
    (module docstring). Since g_w = Σ_t ∇ log π(y_w,t|…), this resolves the sequence cosine κ into token pairs.
    Exact: one forward per response and one autograd.grad per token (meant for short inputs); nan where a token
    gradient is zero. Eval mode during the call, restored after.
    """
    selected = list(select_parameters(model, params).values())
    device = selected[0].device
    pad, seq2seq = _pad_id(model), is_seq2seq(model)
    was_training = model.training
    model.eval()
    try:
        mats = []
        for response in (chosen, rejected):
            logp = _token_logprobs(model, *_pad_batch([prompt], [response], pad, seq2seq, device))[0]
            rows = []
            for t in range(len(response)):
                grads = torch.autograd.grad(logp[t], selected, retain_graph=True, allow_unused=True)
                rows.append(_flatten(selected, grads))
            mats.append(torch.stack(rows))
    finally:
        model.train(was_training)
    g_w, g_l = mats
    with np.errstate(divide="ignore", invalid="ignore"):
        norms = np.outer(g_w.norm(dim=-1).cpu().numpy(), g_l.norm(dim=-1).cpu().numpy())
        return (g_w @ g_l.T).cpu().numpy() / norms
