"""Gradient-entanglement diagnostics: per-pair sequence-gradient norms and inner products (Yuan et al. 2024).

For a preference pair (x, y_w, y_l) write x_w = log π_θ(y_w|x) and x_l = log π_θ(y_l|x) (SUMMED response-token
log-probs) and

    g_w = ∇_θ x_w,  g_l = ∇_θ x_l,  a = ‖g_w‖²,  b = ‖g_l‖²,  ρ = ⟨g_w, g_l⟩,  κ = ρ/√(ab).

Under DPO's gradient flow dx_w ∝ a − ρ and dx_l ∝ ρ − b (``rftlab.preference.predicted_changes``), so the chosen
log-prob falls when ρ > a and the rejected one rises when ρ > b. :func:`pair_gradient_stats` measures these per
pair (``method="fast"``: one batched forward and backward per chunk of pairs with module hooks, inner products
of per-example gradients from Gram matrices of layer inputs and output gradients; ``"exact"``: an autograd
loop, the oracle); :func:`token_gradient_cosines` resolves κ into per-token gradient cosines.

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
                        params: ParamSpec = "all", method: Literal["fast", "exact", "func"] = "fast",
                        chunk_size: int = 32, rtol: float = 1e-5):
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
    response (2 per pair), then dot products of the flattened gradients; causal and seq2seq models.

    ``method="fast"`` (causal models; hook-based "ghost" products): per chunk of ``chunk_size // 2`` pairs, ONE
    forward over the N = 2c padded sequences (chosen rows, then rejected rows) with forward hooks on the modules
    owning selected parameters, and ONE ``autograd.grad`` of Σ_i log π_i with respect to their outputs (no
    parameter gradients are formed). Rows never interact (eval mode, per-row attention masks), so row i of the
    output gradient δ is sequence i's own; δ is zeroed on padding. With x_t the module input at token t
    (N, L, d_in) and δ_t its output gradient (N, L, d_out), per-example gradients are

    - nn.Linear weight (out, in) Σ_t δ_t x_tᵀ, transformers' Conv1D weight (in, out) Σ_t x_t δ_tᵀ, biases Σ_t δ_t;
    - nn.LayerNorm weight Σ_t x̂_t ∘ δ_t (x̂ the normalised input) and bias Σ_t δ_t;
    - RMS norms (torch's nn.RMSNorm, transformers' ``*RMSNorm`` classes and T5LayerNorm: one weight, no bias)
      weight Σ_t x̂_t ∘ δ_t with x̂ = x / √(mean(x²) + ε), for y = x̂ ∘ w and for Gemma's y = x̂ ∘ (1 + w); each
      call's output is checked against one of the two forms (else the error below);
    - nn.Embedding weight (V, H) Σ_t e_{id_t} δ_tᵀ (token and position embeddings; the one-hot is never built);
    - peft LoRA adapters are nn.Linear modules (lora_A, lora_B) and follow the Linear rule.

    Bias and LayerNorm gradients are materialised, (N, numel). For a weight, G = Σ_t u_t v_tᵀ and
    ⟨G_i, G_j⟩ = Σ_{t,s} (u_t·u'_s)(v_t·v'_s): two (L × L') Gram matrices per row pair from float32 bmm
    ([id_t = id'_s] for embedding indices, a gather for index × dense), or the per-example gradients
    materialised (N, numel) when that costs fewer multiply-adds (d_in·d_out small relative to L²); only the
    pairs (i, i), (i+c, i+c), (i, i+c) are formed.
    A parameter used by several modules (GPT-2's tied ``lm_head.weight`` = ``wte.weight``) has G = Σ_k G_k, so
    a, b, ρ include every cross term ⟨G_k, G_m⟩. Sums of products are taken in float32 (cascade sum) per row
    and accumulated over parameters in float64. Memory: the chunk's activations plus (3c × L × L) Gram blocks
    per weight, or (N × numel) where materialised. A selected parameter owned by any other module type (or an
    Embedding with max_norm / sparse), or a hooked call whose tensors are not (batch, tokens, ·), raises
    RftlabError naming method='exact' — nothing falls back silently. An Embedding's padding_idx row gets none.

    ``method="func"``: the previous ``torch.func`` path, ``vmap(grad(functional_call(...)))`` over chunks of
    ``chunk_size`` sequences, any differentiable causal model; per-example gradients (chunk, *param.shape)
    are reduced per parameter tensor. vmap needs eager attention, so ``config._attn_implementation`` is set to
    "eager" for the call and restored after; causal models only (T5's encoder mask check is data-dependent).

    All methods run the model in eval mode (dropout off) and restore its mode; a, b, ρ are float64.
    """
    import pandas as pd

    if not (len(prompts) == len(chosen) == len(rejected)):
        raise RftlabError(f"got {len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses.")
    if method not in ("fast", "exact", "func"):
        raise RftlabError(f"method must be 'fast', 'exact' or 'func', got {method!r}.")
    if chunk_size < 2:
        raise RftlabError(f"chunk_size must be at least 2 (one chosen + one rejected sequence), got {chunk_size}.")
    if method == "func" and is_seq2seq(model):
        raise RftlabError("method='func' supports causal models only: under vmap, transformers' encoder mask checks "
                          "padding_mask.all() (data-dependent); use method='exact' for seq2seq (T5) models.")
    if method == "fast" and is_seq2seq(model):
        raise RftlabError("method='fast' supports causal models only (T5's relative-attention bias and RMS norm "
                          "have no per-example rule); use method='exact' for seq2seq (T5) models.")
    selected = select_parameters(model, params)
    was_training = model.training
    model.eval()
    try:
        impl = {"exact": _stats_exact, "fast": _stats_fast, "func": _stats_func}[method]
        args = () if method == "exact" else (chunk_size // 2,)
        a, b, rho, x_w, x_l = impl(model, prompts, chosen, rejected, selected, *args)
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


def _stats_func(model: nn.Module, prompts: TokenIds, chosen: TokenIds, rejected: TokenIds,
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


# ------------------------------------------------------------------------------ hook-based (ghost) method
_FORCE_PRODUCTS: Literal["gram", "materialise"] | None = None  # tests: force one product form for every weight
# A factor of a per-example weight gradient G = Σ_t u_t v_tᵀ: ("dense", (N, L, d)) or ("index", ids (N, L), size).
Factor = tuple[str, torch.Tensor, int]


class _Term:
    """One use of a 2-D parameter (rows × cols) in the forward: per-example gradient Σ_t u_t v_tᵀ, (N, rows, cols).

    u and v are dense per-token vectors or, for an embedding's row index, token ids (the one-hot e_id, never
    built). Linear (out, in): u = δ, v = x; Conv1D (in, out): u = x, v = δ; Embedding (V, H): u = ids, v = δ.
    """

    def __init__(self, u: Factor, v: Factor) -> None:
        self.u, self.v = u, v
        self.length = u[1].shape[1]

    def materialise(self) -> torch.Tensor:
        """The per-example gradients, (N, rows·cols) float32."""
        (ku, u, du), (_, v, dv) = self.u, self.v
        if ku == "index":  # scatter δ rows into (N, V, H): Σ_t e_{id_t} δ_tᵀ
            out = torch.zeros(v.shape[0], du, dv, dtype=v.dtype, device=v.device)
            return out.scatter_add_(1, u[..., None].expand(-1, -1, dv), v).flatten(1)
        return torch.bmm(u.transpose(1, 2), v).flatten(1)

    def materialise_cost(self) -> float:
        n, du, dv = self.v[1].shape[0], self.u[2], self.v[2]
        return n * du * dv * (1 if self.u[0] == "index" else self.length)


def _factor_dot(f1: Factor, f2: Factor) -> torch.Tensor:
    """Token-by-token dot products of two factors over the same M rows: (M, L1, L2) with [m, t, s] = f1_t · f2_s."""
    (k1, a, _), (k2, b, _) = f1, f2
    if k1 == "dense" and k2 == "dense":
        return torch.bmm(a, b.transpose(1, 2))
    if k1 == "index" and k2 == "index":
        return (a[:, :, None] == b[:, None, :]).to(torch.float32)
    if k1 == "dense":  # [m, t, s] = a[m, t, id_s]
        return torch.gather(a, 2, b[:, None, :].expand(-1, a.shape[1], -1))
    return torch.gather(b, 2, a[:, None, :].expand(-1, b.shape[1], -1)).transpose(1, 2)


def _factor_cost(f1: Factor, f2: Factor) -> float:
    return f1[2] if f1[0] == f2[0] == "dense" else 1.0


def _rows(f: Factor, rows: slice) -> Factor:
    return f[0], f[1][rows], f[2]


def _gram_products(t1: _Term, t2: _Term, c: int, same_row: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """⟨G1_i, G2_i⟩ for all N = 2c rows, (N,), and ⟨G1_i, G2_{i+c}⟩ for the c pairs, (c,), float64.

    ⟨Σ_t u_t v_tᵀ, Σ_s u'_s v'_sᵀ⟩ = Σ_{t,s} (u_t·u'_s)(v_t·v'_s): two (L × L') Gram matrices per row pair,
    built with float32 bmm; their elementwise product is summed in float32 (cascade sum) per row, then float64.
    """
    every, first, second = slice(None), slice(0, c), slice(c, 2 * c)
    out: list[torch.Tensor | None] = [] if same_row else [None]
    for r1, r2 in ((every, every), (first, second))[0 if same_row else 1:]:
        k_u = _factor_dot(_rows(t1.u, r1), _rows(t2.u, r2))
        k_v = _factor_dot(_rows(t1.v, r1), _rows(t2.v, r2))
        out.append((k_u * k_v).sum((1, 2)).double())
    return out[0], out[1]


def _rms_norm_kind(module: nn.Module, own: list) -> str | None:
    """"rmsnorm" for a module that looks like an RMS norm (checked against its outputs in ``_rms_normalised``)."""
    name = type(module).__name__
    looks = isinstance(module, getattr(nn, "RMSNorm", ())) or name.endswith("RMSNorm") or name == "T5LayerNorm"
    weight = getattr(module, "weight", None)
    if looks and [pn for pn, _ in own] == ["weight"] and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return "rmsnorm"
    return None


def _rms_normalised(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x̂ = x / √(mean(x²) + ε) in float32, (N, L, d), after checking that the call's output ``y`` is x̂ ∘ w or
    x̂ ∘ (1 + w) (both have ∂y/∂w = x̂); anything else is an RftlabError naming method='exact'."""
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", None) if eps is None else eps
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # nn.RMSNorm's default
    xf = x.float()
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w, yf = module.weight.detach().float(), y.detach().float()
    exact = x.dtype == torch.float32 and module.weight.dtype == torch.float32
    tol = (1e-4 if exact else 2e-2) * float(yf.abs().max().clamp_min(1e-12))
    if any(torch.allclose(x_hat * scale, yf, rtol=0, atol=tol) for scale in (w, 1 + w)):
        return x_hat
    raise RftlabError(f"method='fast' found that {type(module).__name__} is neither x/rms(x)·w nor x/rms(x)·(1 + w); "
                      "use method='exact' (or 'func').")


class _Recorder:
    """Forward hooks on the modules that own selected parameters; records inputs and outputs of each call."""

    def __init__(self, lm: nn.Module, selected: dict[str, nn.Parameter]) -> None:
        from transformers.pytorch_utils import Conv1D

        wanted = {id(p): name for name, p in selected.items()}
        covered: set[int] = set()
        self.targets: list[tuple[nn.Module, str, list[tuple[str, nn.Parameter]]]] = []
        kinds = {nn.Linear: "linear", Conv1D: "conv1d", nn.LayerNorm: "layernorm", nn.Embedding: "embedding"}
        for _, module in lm.named_modules():
            own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            kind = kinds.get(type(module)) or _rms_norm_kind(module, own)
            if kind == "embedding" and (module.max_norm is not None or module.sparse):
                kind = None
            if kind is None:
                raise RftlabError(f"method='fast' has no per-example gradient rule for {type(module).__name__} "
                                  f"(parameter {wanted[id(own[0][1])]!r}); use method='exact' (or 'func').")
            self.targets.append((module, kind, own))
            covered.update(id(p) for _, p in own)
        missing = [name for pid, name in wanted.items() if pid not in covered]
        if missing:
            raise RftlabError(f"method='fast' cannot trace parameter {missing[0]!r} to a module that owns it; "
                              "use method='exact' (or 'func').")
        self.calls: list[tuple[nn.Module, str, list[tuple[str, nn.Parameter]], torch.Tensor, torch.Tensor]] = []
        self.rows = 0
        self.handles: list = []

    def __enter__(self) -> _Recorder:
        for module, kind, own in self.targets:
            self.handles.append(module.register_forward_hook(self._hook(module, kind, own)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, module: nn.Module, kind: str, own: list):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0] if inputs else None
            ok = (isinstance(output, torch.Tensor) and isinstance(x, torch.Tensor) and output.dim() == 3
                  and output.shape[0] == self.rows and x.shape[:2] == output.shape[:2])
            if not ok:
                raise RftlabError(f"method='fast' expects {type(module).__name__} calls on (batch, tokens, ·) "
                                  "tensors with the batch first; use method='exact' (or 'func').")
            self.calls.append((module, kind, own, x.detach(), output))
        return hook


def _stats_fast(model: nn.Module, prompts: TokenIds, chosen: TokenIds, rejected: TokenIds,
                selected: dict[str, nn.Parameter], pairs_per_chunk: int) -> tuple[torch.Tensor, ...]:
    """Hook-based per-example inner products (see :func:`pair_gradient_stats`); a, b, ρ, x_w, x_l, each (B,)."""
    lm = unwrap(model)
    device = next(iter(selected.values())).device
    pad = _pad_id(model)
    recorder = _Recorder(lm, selected)
    order = {id(p): i for i, p in enumerate(selected.values())}
    out = []
    for start in range(0, len(prompts), pairs_per_chunk):
        part = slice(start, start + pairs_per_chunk)
        c = len(prompts[part])
        batch = _pad_batch(list(prompts[part]) * 2, list(chosen[part]) + list(rejected[part]), pad, False, device)
        recorder.rows, recorder.calls = 2 * c, []
        with torch.enable_grad(), recorder:
            logp = _token_logprobs(model, *batch).sum(-1)  # (2c,): chosen rows, then rejected rows
        calls = recorder.calls
        recorder.calls = []
        outputs = [call[-1] for call in calls]
        # rows never interact (eval mode, per-row attention masks), so ∂(Σ_i logp_i)/∂output_i is row i's own
        deltas = torch.autograd.grad(logp.sum(), outputs, allow_unused=True) if outputs else []
        mask = torch.cat([batch[1], batch[3]], dim=1)
        mask = None if bool(mask.all()) else mask.to(torch.float32)
        terms: dict[int, list[_Term]] = {}
        vectors: dict[int, torch.Tensor] = {}
        for (module, kind, own, x, y), delta in zip(calls, deltas, strict=True):
            if delta is None:
                continue
            # kept positions are the trailing ones (GPT-2's logits_to_keep); padding gets δ = 0
            delta = delta.to(torch.float32)
            if mask is not None:
                delta = delta * mask[:, -delta.shape[1]:, None]
            _add_call(module, kind, own, x, y, delta, terms, vectors)
        acc = torch.zeros(3, c, dtype=torch.float64, device=device)
        for key in sorted(vectors.keys() | terms.keys(), key=order.__getitem__):
            if key in vectors:
                g = vectors[key]
                self_, cross = (g * g).sum(-1).double(), (g[:c] * g[c:]).sum(-1).double()
            else:
                self_, cross = _weight_products(terms[key], c)
            acc += torch.stack([self_[:c], self_[c:], cross])
        out.append(torch.cat([acc, logp.detach().double().view(2, c)]))
    return tuple(torch.cat(out, dim=1))


def _add_call(module: nn.Module, kind: str, own: list, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
              terms: dict[int, list[_Term]], vectors: dict[int, torch.Tensor]) -> None:
    """Per-example gradient pieces of one module call: 2-D weights as _Term, vectors materialised (N, numel)."""

    def add_vector(p: nn.Parameter, g: torch.Tensor) -> None:
        vectors[id(p)] = vectors[id(p)] + g if id(p) in vectors else g

    dense_delta: Factor = ("dense", delta, delta.shape[-1])
    for pname, p in own:
        if kind == "embedding":  # weight (V, H): Σ_t e_{id_t} δ_tᵀ; the padding_idx row gets no gradient
            ids = x
            if module.padding_idx is not None:
                delta = delta * (ids != module.padding_idx)[..., None]
                dense_delta = ("dense", delta, delta.shape[-1])
            term = _Term(("index", ids, module.num_embeddings), dense_delta)
        elif kind == "layernorm":  # weight: Σ_t x̂_t ∘ δ_t; bias: Σ_t δ_t
            if pname == "weight":
                x_hat = torch.nn.functional.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
                add_vector(p, (x_hat * delta).sum(1).flatten(1))
            else:
                add_vector(p, delta.sum(1).flatten(1))
            continue
        elif kind == "rmsnorm":  # weight: Σ_t x̂_t ∘ δ_t
            add_vector(p, (_rms_normalised(module, x, y) * delta).sum(1).flatten(1))
            continue
        elif pname == "bias":  # Linear / Conv1D bias: Σ_t δ_t
            add_vector(p, delta.sum(1))
            continue
        elif kind == "linear":  # weight (out, in): Σ_t δ_t x_tᵀ
            term = _Term(dense_delta, ("dense", x.float(), x.shape[-1]))
        else:  # Conv1D weight (in, out): Σ_t x_t δ_tᵀ
            term = _Term(("dense", x.float(), x.shape[-1]), dense_delta)
        terms.setdefault(id(p), []).append(term)


def _weight_products(terms: list[_Term], c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Self (N,) and cross (c,) inner products of Σ_k G_k over the uses k of one 2-D parameter (tied: k = 2).

    Per parameter, whichever is cheaper by a multiply-add count: materialise each row's gradient (bmm /
    scatter, then dot products) or the Gram form over every ordered pair of uses (cross terms included).
    """
    n = 2 * c
    numel = terms[0].u[2] * terms[0].v[2]
    materialise = sum(t.materialise_cost() for t in terms) + 1.5 * n * numel
    gram = sum(1.5 * n * t1.length * t2.length * (_factor_cost(t1.u, t2.u) + _factor_cost(t1.v, t2.v))
               for t1 in terms for t2 in terms)
    if _FORCE_PRODUCTS == "materialise" or (_FORCE_PRODUCTS is None and materialise <= gram):
        g = terms[0].materialise()
        for t in terms[1:]:
            g += t.materialise()
        return (g * g).sum(-1).double(), (g[:c] * g[c:]).sum(-1).double()
    self_ = torch.zeros(n, dtype=torch.float64, device=terms[0].v[1].device)
    cross = torch.zeros(c, dtype=torch.float64, device=self_.device)
    for i, t1 in enumerate(terms):
        for j, t2 in enumerate(terms):
            # on the same row ⟨G_i, G_j⟩ = ⟨G_j, G_i⟩: counted twice at j > i; across rows both orders count
            s, x = _gram_products(t1, t2, c, same_row=j >= i)
            if s is not None:
                self_ += s if i == j else 2 * s
            cross += x
    return self_, cross


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
