"""A fused GPT-2 path for the training and sampling hot loops: shared prompts, packed tokens, a static KV cache.

The language models of the experiments are small GPT-2s on a CPU, where a step costs less in multiply-adds than
in what surrounds them: padding, a prompt encoded once per response, logits nobody reads, and the Python of a
general-purpose forward and ``generate``. Two routines read the weights of a ``transformers`` GPT2LMHeadModel
directly (so gradients reach its parameters and any optimizer over ``model.parameters()`` trains them) and
compute exactly what its forward computes, up to float rounding:

:func:`grouped_logprobs` — log π(y_r,t | x_g(r), y_r,<t) of R responses to B prompts, response r continuing
prompt g(r) (DPO: a pair's chosen and rejected share one prompt, g = [0..B−1, 0..B−1]; K samples per prompt:
g(r) = ⌊r/K⌋). One forward in which

- each prompt is run ONCE: the responses of a group attend to its prompt's keys and values (a prompt's hidden
  states do not depend on what follows it in a causal model, so this is the same function);
- tokens are packed: every linear layer, norm and activation runs on the n real tokens only, (n, d); attention
  gathers them into a padded (B, H, P, d_h) prompt block and an (R, H, T', d_h) response block, with masks
  (when the responses are all but equally long — K samples that ran to ``max_new_tokens`` — they stay padded
  in the packed order: ≤ 5% extra tokens instead of a gather and a scatter per layer);
- the last token of each response is never fed (nothing reads its hidden state), and the LM head runs only on
  the positions whose next token is scored: the last prompt token (shared by the group's first response
  tokens) and the responses' own tokens.

Per response, the cost falls from (|x| + |y|) tokens to |y| − 1 + |x|/|group|.

:func:`sample_tokens` — ancestral sampling for B prompts × K samples: the prompts are encoded once (B rows, not
B·K) and their keys and values kept once, (B, H, P, d_h) per layer, beside a cache preallocated for the generated
tokens, step-major (T, R, H, d_h) so that a step writes one contiguous block; then one token per step for all R
rows, each row's query attending to its prompt's keys (one product per prompt for its K rows, so the prompt cache
is read once per step, not K times) and to its own.
Each step draws with ``torch.multinomial`` from softmax(logits/τ) over the same (R, V) rows as
``generate(do_sample=True, num_return_sequences=K)`` (EOS masked to −inf before ``min_new_tokens``; finished rows
emit the pad id; stop when every row has emitted EOS), so under one seed the draws agree with ``generate``
wherever the logits agree to float rounding.

:func:`fused_model` decides when these apply: a plain GPT2LMHeadModel on the CPU, with no forward/backward hooks
(diagnostics, peft and tests hook modules), dropout inactive, no gradient checkpointing, not compiled with
``model.compile()``, and the standard attention options. Anything else — T5, peft wrappers, a PolicyWithValue's
forward, a DDP wrapper, CUDA (whose performance path is the model's own kernels) — goes through the model's own
forward, unchanged.
``torch.autocast("cpu", dtype=torch.bfloat16)`` applies as it would to the forward (matmuls in bf16, norms and
the log-softmax in float32), except that attention stays in float32: in training (see ``_attend``) and in the
decode steps of sampling (see ``_decode_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

ENABLED = True  # False sends every call through the model's own forward (to compare, or to rule this path out)


def _has_hooks(model: nn.Module) -> bool:
    """Hooks anywhere in ``model`` (they would be bypassed), or gradient checkpointing switched on."""
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks:
        return True
    # gradient checkpointing is asked for to save memory; the fused path keeps every activation
    return any(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
               or getattr(mod, "_backward_pre_hooks", None) or getattr(mod, "gradient_checkpointing", False)
               for mod in model.modules())


def fused_model(model: nn.Module) -> nn.Module | None:
    """``model`` when the fused path computes what its own forward would, else None (see the module docstring)."""
    if not ENABLED:
        return None
    from transformers import GPT2LMHeadModel

    if type(model) is not GPT2LMHeadModel:
        return None
    cfg = model.config
    if cfg.add_cross_attention or getattr(cfg, "reorder_and_upcast_attn", False):
        return None
    if getattr(model.lm_head, "bias", None) is not None:
        return None
    if model.training and max(cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) > 0:
        return None
    if model.lm_head.weight.device.type != "cpu" or _has_hooks(model):
        return None
    if getattr(model, "_compiled_call_impl", None) is not None:  # model.compile() asked for torch.compile's code
        return None
    return model


# ---------------------------------------------------------------------------------------------- layout
DENSE_WASTE = 0.05  # responses stay padded (no gathers) when padding adds at most this share of their tokens


@dataclass
class _Layout:
    """Where each token of a grouped batch sits: packed (n,) order = real prompt tokens, then response inputs.

    Response inputs are packed (real tokens only) unless they are nearly all as long as the longest one
    (``dense``: padding ≤ DENSE_WASTE of them — K samples of a fixed length): then the (R, T') block is kept
    padded in the packed order, so attention reads it as a view instead of gathering it, and padded slots are
    computed but masked out as keys and never scored.
    """

    ids: torch.Tensor  # (n,) token ids fed to the model
    positions: torch.Tensor  # (n,) GPT-2 position ids (real tokens counted from 0 in each sequence)
    p_gather: torch.Tensor  # (B·P,) packed index of each padded prompt slot (pads: 0, masked out)
    p_back: torch.Tensor  # (n_p,) slot in the (B·P) prompt block of each packed prompt token
    r_gather: torch.Tensor | None  # (R·T',) packed index of each padded response-input slot (None: dense)
    r_back: torch.Tensor | None  # (n_r,) slot in the (R·T') response block of each packed response token
    n_prompt: int  # n_p, packed prompt tokens (the response inputs follow them)
    mask_p: torch.Tensor  # (B, 1, P, P) bool: causal over real prompt tokens (a pad query sees itself)
    mask_r: torch.Tensor | None  # (R, 1, T', P + T') bool: the group's prompt, then causal over own inputs
    group: torch.Tensor  # (R,) prompt of each response
    head_rows: torch.Tensor  # (m,) packed rows whose logits score a token, one per scored token
    targets: torch.Tensor  # (m,) the token each row scores
    scored: torch.Tensor  # (R, T) bool: response tokens with a log-prob (the response mask)
    shape: tuple[int, int, int]  # B, P, T'


def _layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
            response_mask: torch.Tensor, group: torch.Tensor) -> _Layout | None:
    """The packed layout, or None when the masks are not left-padded prompts / right-padded responses."""
    pm, rm = prompt_mask.bool(), response_mask.bool()
    b, p = pm.shape
    r = rm.shape[0]
    # left-padded prompts with at least one token; responses 1…1 0…0 (anything else: the model's own forward)
    if p == 0 or not pm[:, -1].all() or (pm[:, 1:] < pm[:, :-1]).any() or (rm[:, 1:] > rm[:, :-1]).any():
        return None
    p_len, r_len = pm.sum(1), rm.sum(1)
    t_in = max(int(r_len.max()) - 1, 0) if r else 0  # response tokens fed: all but the last
    fed = torch.arange(t_in) < (r_len - 1)[:, None]  # (R, T')
    n_p, n_r = int(p_len.sum()), int(fed.sum())
    dense = r * t_in <= (1 + DENSE_WASTE) * n_r
    slots = torch.ones_like(fed) if dense else fed  # response slots that enter the packed order
    r_positions = torch.where(fed, p_len[group][:, None] + torch.arange(t_in), 0)  # pad slots: any valid position
    ids = torch.cat([prompt_ids[pm], response_ids[:, :t_in][slots]])
    positions = torch.cat([(pm.cumsum(1) - 1)[pm], r_positions[slots]])
    p_gather = torch.zeros(b, p, dtype=torch.long)
    p_gather[pm] = torch.arange(n_p)
    r_gather = torch.zeros(r, t_in, dtype=torch.long)
    r_gather[slots] = torch.arange(n_p, n_p + int(slots.sum()))
    causal_p = torch.ones(p, p, dtype=torch.bool).tril()
    mask_p = (causal_p & pm[:, None, :]) | torch.eye(p, dtype=torch.bool)
    mask_r = None
    if t_in:
        own = torch.ones(t_in, t_in, dtype=torch.bool).tril() & fed[:, None, :]
        mask_r = torch.cat([pm[group][:, None, :].expand(r, t_in, p), own], dim=2)[:, None]
    # token s of response r is scored from the last prompt token of its group (s = 0) or from its token s − 1
    last = p_len.cumsum(0) - 1  # packed index of each prompt's last token
    src = torch.empty_like(response_ids)
    src[:, 0] = last[group]
    width = min(t_in, src.shape[1] - 1)
    src[:, 1: width + 1] = r_gather[:, :width]
    src[:, width + 1:] = 0
    packed_r = t_in and not dense
    return _Layout(ids=ids, positions=positions, p_gather=p_gather.flatten(),
                   p_back=pm.flatten().nonzero().squeeze(1), r_gather=r_gather.flatten() if packed_r else None,
                   r_back=fed.flatten().nonzero().squeeze(1) if packed_r else None, n_prompt=n_p,
                   mask_p=mask_p[:, None], mask_r=mask_r, group=group, head_rows=src[rm], targets=response_ids[rm],
                   scored=rm, shape=(b, p, t_in))


# ---------------------------------------------------------------------------------------------- forward
def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """transformers' Conv1D: x W + b with W stored (in, out)."""
    return torch.addmm(conv.bias, x, conv.weight)


def _heads(qkv: torch.Tensor, rows: int, length: int, n_head: int) -> tuple[torch.Tensor, ...]:
    """(rows·length, 3d) → q, k, v each (rows, H, length, d_h), strided views."""
    return qkv.view(rows, length, 3, n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _attend(qkv: torch.Tensor, lay: _Layout, n_head: int, scale: float) -> torch.Tensor:
    """Grouped attention on packed (n, 3d) projections → (n, d).

    Attention runs in float32 even under bf16 autocast: it is a few percent of the multiply-adds, and torch's
    CPU flash-attention backward is several times slower in bf16 than in float32.
    """
    b, p, t_in = lay.shape
    d = qkv.shape[1] // 3
    if qkv.dtype != torch.float32 and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return _attend(qkv.float(), lay, n_head, scale)
    q, k, v = _heads(qkv.index_select(0, lay.p_gather), b, p, n_head)
    out_p = F.scaled_dot_product_attention(q, k, v, attn_mask=lay.mask_p, scale=scale)
    out_p = out_p.transpose(1, 2).reshape(b * p, d).index_select(0, lay.p_back)
    if not t_in:
        return out_p
    r = lay.group.shape[0]
    responses = qkv[lay.n_prompt:] if lay.r_gather is None else qkv.index_select(0, lay.r_gather)
    q_r, k_r, v_r = _heads(responses, r, t_in, n_head)
    keys = torch.cat([k.index_select(0, lay.group), k_r], dim=2)  # the group's prompt, then its own tokens
    values = torch.cat([v.index_select(0, lay.group), v_r], dim=2)
    out_r = F.scaled_dot_product_attention(q_r, keys, values, attn_mask=lay.mask_r, scale=scale)
    out_r = out_r.transpose(1, 2).reshape(r * t_in, d)
    return torch.cat([out_p, out_r if lay.r_back is None else out_r.index_select(0, lay.r_back)])


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _activation(act: nn.Module):
    """The MLP activation to call: GPT-2's ``gelu_new``, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as torch's
    one tanh-GELU kernel. transformers' NewGELUActivation writes it as eight elementwise ops, each kept for
    backward: 3–4× the time of the kernel forward and backward on (n, 4d), for the same function up to float
    rounding. Any other activation is called as the model calls it."""
    from transformers.activations import NewGELUActivation

    return _tanh_gelu if type(act) is NewGELUActivation else act


def _blocks(lm: nn.Module, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
    """Embeddings and every transformer block on packed tokens, (n,) → (n, d) before the final norm."""
    t = lm.transformer
    h = F.embedding(ids, t.wte.weight) + F.embedding(positions, t.wpe.weight)
    for i, block in enumerate(t.h):
        attn, mlp = block.attn, block.mlp
        h = h + _linear(attend(i, _linear(_ln(h, block.ln_1), attn.c_attn), attn), attn.c_proj)
        h = h + _linear(_activation(mlp.act)(_linear(_ln(h, block.ln_2), mlp.c_fc)), mlp.c_proj)
    return h


def grouped_logprobs(lm: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     response_ids: torch.Tensor, response_mask: torch.Tensor, group: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor | None:
    """log π(y_r,t | x_g(r), y_r,<t) at temperature τ, (R, T) float32, 0 where ``response_mask`` is 0.

    prompt_ids, prompt_mask: (B, P), left-padded, each prompt ≥ 1 token; response_ids, response_mask: (R, T),
    right-padded; group: (R,) long, the prompt of each response. ``lm`` must pass :func:`fused_model`.
    Differentiable. Returns None when the masks are not laid out as described (the caller then uses the
    model's own forward).
    """
    lay = _layout(prompt_ids, prompt_mask, response_ids, response_mask, group)
    if lay is None:
        return None
    n_head = lm.config.n_head

    def attend(_: int, qkv: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        return _attend(qkv, lay, n_head, attn.scaling)

    h = _blocks(lm, lay.ids, lay.positions, attend)
    # LM head on the scoring rows only; a prompt's last row appears once per response of its group
    logits = F.linear(_ln(h.index_select(0, lay.head_rows), lm.transformer.ln_f), lm.lm_head.weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    token_logp = -F.cross_entropy(logits, lay.targets, reduction="none")
    return token_logp.new_zeros(lay.scored.shape).masked_scatter(lay.scored, token_logp)


# ---------------------------------------------------------------------------------------------- sampling
def sample_tokens(lm: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int, *,
                  max_new_tokens: int, min_new_tokens: int, temperature: float, eos_token_id: int,
                  pad_token_id: int) -> torch.Tensor:
    """K sampled continuations of B left-padded prompts, (B·K, T) token ids, row b·K + j = sample j of prompt b.

    T ≤ ``max_new_tokens``: generation stops once every row has emitted EOS; after its EOS a row holds the pad
    id (as ``generate``). Draws from the global torch RNG (fork it for a seed). ``lm`` must pass
    :func:`fused_model`. Runs in inference mode; the result is an ordinary tensor (ids feed training forwards).
    """
    with torch.inference_mode():
        ids = _sample(lm, prompt_ids, prompt_mask, k, max_new_tokens, min_new_tokens, temperature, eos_token_id,
                      pad_token_id)
    return ids.clone()


def _sample(lm: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int, max_new_tokens: int,
            min_new_tokens: int, temperature: float, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    t = lm.transformer
    b, p = prompt_ids.shape
    r, n_head = b * k, lm.config.n_head
    d = t.wte.weight.shape[1]
    d_h = d // n_head
    pm = prompt_mask.bool()
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    prefill_mask = ((causal & pm[:, None, :]) | torch.eye(p, dtype=torch.bool))[:, None]
    # the caches of the whole generation: the prompts' keys and values once per prompt (B rows, read by the K
    # samples of each), the generated tokens' per row (R rows); in the weights' dtype even under bf16 autocast,
    # as decode attention runs in it (see _decode_attention)
    dtype = t.wte.weight.dtype
    prompt_kv = torch.empty(len(t.h), 2, b, n_head, p, d_h, dtype=dtype)
    # step-major, so that each step's keys and values of all rows are one contiguous write
    new_kv = torch.empty(len(t.h), 2, max_new_tokens, r, n_head, d_h, dtype=dtype)
    prompt_bias = torch.zeros(b * n_head, 1, p, dtype=dtype)  # additive key mask: −inf at prompt padding
    prompt_bias.masked_fill_(~pm.repeat_interleave(n_head, 0)[:, None], -float("inf"))

    def prefill(i: int, qkv: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        q, key, value = _heads(qkv, b, p, n_head)
        prompt_kv[i, 0] = key
        prompt_kv[i, 1] = value
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=prefill_mask, scale=attn.scaling)
        return out.transpose(1, 2).reshape(b * p, d)

    positions = (pm.long().cumsum(1) - 1).clamp_min(0)
    h = _blocks(lm, prompt_ids.flatten(), positions.flatten(), prefill).view(b, p, d)[:, -1]
    logits = F.linear(_ln(h, t.ln_f), lm.lm_head.weight).float().repeat_interleave(k, 0)  # (R, V)
    position = pm.sum(1).repeat_interleave(k, 0)  # next position of each row
    out = torch.full((r, max_new_tokens), pad_token_id, dtype=torch.long)
    unfinished = torch.ones(r, dtype=torch.bool)
    step = 0
    while True:
        if temperature != 1.0:
            logits = logits / temperature
        if step < min_new_tokens:
            logits[:, eos_token_id] = -float("inf")
        token = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
        token = torch.where(unfinished, token, pad_token_id)
        out[:, step] = token
        unfinished &= token != eos_token_id
        step += 1
        if step == max_new_tokens or not unfinished.any():
            break

        def decode(i: int, qkv: torch.Tensor, attn: nn.Module, step: int = step) -> torch.Tensor:
            q, key, value = _heads(qkv, r, 1, n_head)
            new_kv[i, 0, step - 1] = key[:, :, 0]
            new_kv[i, 1, step - 1] = value[:, :, 0]
            with torch.autocast("cpu", enabled=False):
                return _decode_attention(q.to(dtype) * attn.scaling, prompt_kv[i], prompt_bias,
                                         new_kv[i, :, :step])

        h = _blocks(lm, token, position, decode)
        position = position + 1
        logits = F.linear(_ln(h, t.ln_f), lm.lm_head.weight).float()
    return out[:, :step]


def _decode_attention(q: torch.Tensor, prompt_kv: torch.Tensor, prompt_bias: torch.Tensor,
                      new_kv: torch.Tensor) -> torch.Tensor:
    """One decode step's attention: each row's query over its prompt's keys, then over its own generated keys.

    q: (R, H, 1, d_h) queries, already scaled; prompt_kv: (2, B, H, P, d_h) keys and values of the B prompts, row
    r = b·K + j continuing prompt b; prompt_bias: (B·H, 1, P), −inf at prompt padding; new_kv: (2, t, R, H, d_h)
    of the t tokens generated so far (all visible), step-major. Returns
    softmax([q k_promptᵀ + bias ; q k_newᵀ]) [v_prompt ; v_new] as (R, H·d_h).

    The prompt part is one (K × d_h)·(d_h × P) product per prompt and head, so a prompt's cache is read once for
    its K rows rather than K times (a copy per row would also hold K times the memory); the softmax is taken over
    both parts at once. At one query per row this is also faster than torch's CPU flash-attention kernel. Under
    bf16 autocast it runs in the weights' float32 (the caller turns autocast off): its products are a small share
    of a step's multiply-adds, and bf16 scores would be rounded to 3 significant digits before the softmax.
    """
    r, h, _, d_h = q.shape
    b, p, t = prompt_kv.shape[1], prompt_kv.shape[3], new_kv.shape[1]
    k = r // b
    q = q.reshape(r, h, d_h)
    q_grouped = q.view(b, k, h, d_h).transpose(1, 2).reshape(b * h, k, d_h)  # the K queries of each prompt
    scores_prompt = torch.baddbmm(prompt_bias, q_grouped, prompt_kv[0].view(b * h, p, d_h).transpose(1, 2))
    keys_new, values_new = (x.view(t, r * h, d_h).transpose(0, 1) for x in new_kv)  # (R·H, t, d_h), strided views
    scores_new = torch.bmm(q.view(r * h, 1, d_h), keys_new.transpose(1, 2))
    scores_prompt = scores_prompt.view(b, h, k, p).transpose(1, 2).reshape(r * h, p)
    weights = torch.cat([scores_prompt, scores_new.view(r * h, t)], 1).softmax(-1)  # (R·H, P + t)
    w_prompt = weights[:, :p].view(b, k, h, p).transpose(1, 2).reshape(b * h, k, p)
    out_prompt = torch.bmm(w_prompt, prompt_kv[1].view(b * h, p, d_h)).view(b, h, k, d_h).transpose(1, 2)
    out_new = torch.bmm(weights[:, None, p:], values_new)
    return out_prompt.reshape(r, h * d_h) + out_new.view(r, h * d_h)
