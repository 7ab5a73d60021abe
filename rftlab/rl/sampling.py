"""K samples per prompt and their per-token log-probs, for causal (GPT-2) and seq2seq (T5) policies.

:func:`sample` draws y ~ p_θ(·|x) for B prompts × K samples with one batched ``generate`` call per chunk of
prompts (KV cache on), then scores all B·K responses with one batched teacher-forced forward:

    logprobs[i, t] = log softmax(f_θ(x_i, y_i,<t) / τ)[y_i,t]        for t < |y_i| (0 after)

These are the log-probs of the *untruncated* policy at temperature τ, the π_θ whose expected reward RFT
ascends and whose ratio π_θ/π_old PPO clips. ``top_k``, ``top_p`` and ``min_new_tokens`` only change which
tokens get drawn (the decoding strategy), not the policy being scored, so their truncation and
renormalisation are deliberately left out of the log-probs (generate's ``output_scores`` would include
them). With top_k=0, top_p=1, min_new_tokens=0 the log-probs are exactly those of the sampling
distribution.

Layout: sample j of prompt b is row i = b·K + j (prompt-major); ``response_mask`` is 1 up to and including
the first EOS and 0 after (tokens after EOS are padding, whatever their id: GPT-2 pads with EOS).

Speed: for a plain GPT-2 on the CPU (:func:`rftlab.rl.fast_gpt2.fused_model`), sampling runs
:func:`rftlab.rl.fast_gpt2.sample_tokens` (prompts encoded once per prompt, not once per sample; a
preallocated KV cache) when ``top_k=0`` and ``top_p=1`` (otherwise ``generate``, whose warpers define those),
and :func:`response_logprobs` runs :func:`rftlab.rl.fast_gpt2.grouped_logprobs`: each distinct prompt of the
batch once, no compute on padding, the LM head only where a token is scored. Same draws under a seed and the
same log-probs up to float rounding; every other model goes through its own forward and ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from rftlab.errors import RftlabError
from rftlab.models import PolicyWithValue, is_seq2seq, response_forward_hidden, unwrap
from rftlab.rl import fast_gpt2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Rollout:
    """B prompts × K sampled responses, N = B·K rows in prompt-major order."""

    prompts: list[str]  # the B prompt strings
    prompt_ids: torch.Tensor  # (N, P) prompt tokens, left-padded for causal models, right-padded for seq2seq
    prompt_mask: torch.Tensor  # (N, P) 1 on prompt tokens, 0 on padding
    response_ids: torch.Tensor  # (N, T) sampled tokens, padded with pad_token_id after the first EOS
    response_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS, 0 after
    logprobs: torch.Tensor  # (N, T) log π_θ(y_t | x, y_<t) at temperature τ, 0 where response_mask is 0
    prompt_index: torch.Tensor  # (N,) index into ``prompts`` of each row
    k: int  # samples per prompt
    temperature: float  # τ of the sampling and of ``logprobs``

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Response lengths including EOS, (N,)."""
        return self.response_mask.sum(-1)

    @property
    def sequence_logprobs(self) -> torch.Tensor:
        """log π_θ(y|x) of every response, (N,)."""
        return sequence_logprob(self.logprobs, self.response_mask)

    def by_prompt(self, values: torch.Tensor) -> torch.Tensor:
        """Group per-row values by prompt: (N, ...) → (B, K, ...), e.g. rewards for per-input mean/std."""
        return values.view(len(self.prompts), self.k, *values.shape[1:])

    def texts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Decoded responses, (N,), special tokens (EOS, padding) removed."""
        ids = torch.where(self.response_mask.bool(), self.response_ids, tokenizer.pad_token_id)
        return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    def to(self, device: torch.device | str) -> Rollout:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y|x) = Σ_t mask_t · log p(y_t|x, y_<t): (B, T), (B, T) → (B,)."""
    return (logprobs * mask).sum(-1)


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after: (B, T) → (B, T) long."""
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


@dataclass(frozen=True)
class ResponseOutput:
    """Teacher-forced pass over (prompt, response) pairs; every tensor is indexed by response position."""

    logits: torch.Tensor  # (B, T, V) logits ÷ τ of p(·|x, y_<t) (entropy: rftlab.rl.losses.token_entropy)
    logprobs: torch.Tensor  # (B, T) log p(y_t|x, y_<t) at τ, 0 where response_mask is 0
    values: torch.Tensor | None  # (B, T) V(x, y_<t) when the model is a PolicyWithValue, else None


def response_forward(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     response_ids: torch.Tensor, response_mask: torch.Tensor,
                     temperature: float = 1.0) -> ResponseOutput:
    """Logits, per-token log-probs and (for a PolicyWithValue) values of the responses, in one forward.

    Differentiable (call under ``torch.no_grad()`` for scoring only). Shapes as in :class:`Rollout`.
    """
    if isinstance(model, PolicyWithValue):
        logits, values = model(prompt_ids, prompt_mask, response_ids, response_mask)
    else:
        logits, _ = response_forward_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
        values = None
    logits = logits.float() / temperature
    # log softmax at the sampled token only: gather − logsumexp skips a second (B, T, V) tensor
    token_logp = logits.gather(-1, response_ids[..., None]).squeeze(-1) - logits.logsumexp(-1)
    logprobs = torch.where(response_mask.bool(), token_logp, torch.zeros_like(token_logp))
    return ResponseOutput(logits=logits, logprobs=logprobs, values=values)


def response_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """log p_θ(y_t|x, y_<t) at temperature τ for every response token, (B, T), 0 after EOS; one forward.

    Rows that repeat a prompt (K samples of one input, a pair's two responses) share one encoding of it
    on the fused GPT-2 path (module docstring); the result is the same.
    """
    lm = fast_gpt2.fused_model(model)
    if lm is not None and response_ids.shape[0]:
        # one row per distinct prompt: (ids, mask) rows compared whole, `group` maps each response to its prompt
        rows, group = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
        width = prompt_ids.shape[1]
        out = fast_gpt2.grouped_logprobs(lm, rows[:, :width], rows[:, width:], response_ids, response_mask, group,
                                         temperature)
        if out is not None:
            return out
    return response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature).logprobs


def encode_pairs(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str], *,
                 seq2seq: bool, add_eos: bool = True, max_prompt_length: int | None = None,
                 max_response_length: int | None = None) -> tuple[torch.Tensor, ...]:
    """Tokenize given (prompt, response) pairs in the layout of :class:`Rollout` (SFT targets, preference pairs).

    Returns prompt_ids, prompt_mask (B, P) (left-padded for causal models, right-padded for seq2seq) and
    response_ids, response_mask (B, T) (right-padded; EOS appended when ``add_eos``).
    """
    prompt = _encode_prompts(tokenizer, prompts, seq2seq, max_prompt_length)
    eos = [tokenizer.eos_token_id] if add_eos else []
    rows = [ids[: (max_response_length - len(eos)) if max_response_length else None] + eos
            for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
    width = max(map(len, rows))
    response_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, ids in enumerate(rows):  # one row copy per pair: tokenization itself is the cost here
        response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[i, : len(ids)] = 1
    return prompt["input_ids"], prompt["attention_mask"], response_ids, response_mask


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], seq2seq: bool,
                    max_length: int | None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (B, P) of the prompts, with the tokenizer's special tokens, padded on the left
    for causal models (they continue from the last prompt token) and on the right for encoders (T5's side).

    A prompt rendered by a chat template usually starts with the BOS token already (Llama's
    ``<|begin_of_text|>``), and a tokenizer that adds BOS would add a second one; it is kept once, as a
    generation from that template would see it.
    """
    side = "right" if seq2seq else "left"
    kwargs = {"truncation": max_length is not None, "max_length": max_length}
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is not None and bos_text and any(p.startswith(bos_text) for p in prompts):
        rows = [ids[1:] if ids[:2] == [bos, bos] else ids for ids in tokenizer(list(prompts), **kwargs)["input_ids"]]
        return tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt", padding_side=side)
    return tokenizer(list(prompts), padding=True, return_tensors="pt", padding_side=side, **kwargs)


@torch.no_grad()
def sample(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], k: int = 1, *,
           max_new_tokens: int, min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, batch_size: int = 64, seed: int | None = None,
           max_prompt_length: int | None = None, progress: Callable[[int], object] | None = None,
           score_logprobs: bool = True) -> Rollout:
    """Draw ``k`` responses for each prompt and score them under the policy (see the module docstring).

    ``batch_size`` prompts (batch_size·k sequences) go through each ``generate`` call and each scoring
    forward. ``seed`` fixes the draws without touching the global RNG (None: use and advance it).
    ``model`` is a Hugging Face LM, a peft-wrapped one, or a PolicyWithValue; it is put in eval mode while
    sampling and restored after. ``progress(n)`` is called after each chunk with its number of prompts.
    ``score_logprobs=False`` skips the scoring forward and leaves ``logprobs`` nan, for callers that compute
    the log-probs with gradients anyway (one forward instead of two).
    """
    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    chunks = []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                encoded = _encode_prompts(tokenizer, prompts[start: start + batch_size], seq2seq, max_prompt_length)
                chunks.append(_sample_chunk(model, tokenizer, encoded["input_ids"].to(device),
                                            encoded["attention_mask"].to(device), k, seq2seq, max_new_tokens,
                                            min_new_tokens, temperature, top_k, top_p, score_logprobs))
                if progress is not None:
                    progress(len(chunks[-1][0]) // k)
    finally:
        model.train(was_training)
    pad = tokenizer.pad_token_id
    prompt_side = "right" if seq2seq else "left"
    return Rollout(
        prompts=list(prompts),
        prompt_ids=_cat_padded([c[0] for c in chunks], pad, prompt_side),
        prompt_mask=_cat_padded([c[1] for c in chunks], 0, prompt_side),
        response_ids=_cat_padded([c[2] for c in chunks], pad, "right"),
        response_mask=_cat_padded([c[3] for c in chunks], 0, "right"),
        logprobs=_cat_padded([c[4] for c in chunks], 0.0, "right"),
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(k),
        k=k, temperature=temperature,
    )


def _sample_chunk(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
                  prompt_mask: torch.Tensor, k: int, seq2seq: bool, max_new_tokens: int, min_new_tokens: int,
                  temperature: float, top_k: int, top_p: float,
                  score_logprobs: bool = True) -> tuple[torch.Tensor, ...]:
    """One generate call (or the fused sampler) for b prompts × k samples, then one scoring forward (unless
    ``score_logprobs`` is False); tensors of b·k rows."""
    lm = unwrap(model)
    limit = getattr(lm.config, "n_positions", None) if not seq2seq else None  # GPT-2's learned positions
    if limit is not None and prompt_ids.shape[1] + max_new_tokens > limit:
        raise RftlabError(f"prompt ({prompt_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                          f"model's {limit} positions: raise model.n_positions or set max_prompt_length.")
    # the fused sampler draws from softmax(logits/τ) as generate does; top-k/top-p warpers stay generate's
    fused = fast_gpt2.fused_model(lm) if top_k == 0 and top_p == 1.0 and bool(prompt_mask[:, -1].all()) else None
    if fused is not None:
        response_ids = fast_gpt2.sample_tokens(fused, prompt_ids, prompt_mask, k, max_new_tokens=max_new_tokens,
                                               min_new_tokens=min_new_tokens, temperature=temperature,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    else:
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, num_return_sequences=k,
                          max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
        # causal output = prompt ; response.  seq2seq output = decoder_start ; response
        response_ids = out[:, 1:] if seq2seq else out[:, prompt_ids.shape[1]:]
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    response_ids = torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id)
    rows_ids, rows_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
    if not score_logprobs:
        logprobs = torch.full(response_ids.shape, float("nan"), device=response_ids.device)
    else:
        logprobs = None
        if fused is not None:  # each prompt encoded once for its k samples
            group = torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(k)
            with torch.inference_mode():
                logprobs = fast_gpt2.grouped_logprobs(fused, prompt_ids, prompt_mask, response_ids, response_mask,
                                                      group, temperature)
            logprobs = None if logprobs is None else logprobs.clone()  # out of inference mode
        if logprobs is None:
            logprobs = response_logprobs(lm, rows_ids, rows_mask, response_ids, response_mask, temperature)
    return rows_ids, rows_mask, response_ids, response_mask, logprobs


def _cat_padded(tensors: list[torch.Tensor], value: float, side: str) -> torch.Tensor:
    """Concatenate (n_i, L_i) tensors along rows, padding columns to max L_i on ``side``."""
    width = max(t.shape[1] for t in tensors)
    pads = [(width - t.shape[1], 0) if side == "left" else (0, width - t.shape[1]) for t in tensors]
    return torch.cat([nn.functional.pad(t, pad, value=value) for t, pad in zip(tensors, pads, strict=True)])
