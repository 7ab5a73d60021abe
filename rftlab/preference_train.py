"""Preference finetuning of a language model on fixed pairs (DPO and the margin-loss family of
``rftlab.preference``), with SFT on the chosen responses and the measurements logged around it.

Pairs are tokenized once into a :class:`PreferenceData` (the layout of ``rftlab.rl.sampling.encode_pairs``:
prompts left-padded for causal models, right-padded for seq2seq; responses right-padded). The reference
log-probs log π_ref(y|x) are computed once per pair (:func:`with_reference`), not at every step: the reference
is frozen, so recomputing them only costs time. Chosen and rejected go through the model in ONE forward
(:func:`pair_token_logps`): for a plain GPT-2 on the CPU the fused path of ``rftlab.rl.fast_gpt2`` runs each
prompt once for both responses, packs out the padding and scores only response tokens; any other model reads
2N rows [x ; y] through its own forward. Reference and held-out passes run in ``torch.inference_mode``.

Metric names follow TRL's DPOTrainer where it has them: ``rewards/chosen`` = β(x_w − x_w^ref),
``rewards/rejected`` = β(x_l − x_l^ref), ``rewards/margins`` (their difference), ``rewards/accuracies``
(share with a positive margin), ``logps/chosen`` = x_w and ``logps/rejected`` = x_l (SUMMED over response
tokens). rftlab adds ``logps/chosen_per_token``, ``logps/rejected_per_token`` (x/|y|) and ``logps/margin``
(x_w − x_l, the margin without the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from rftlab.preference import preference_loss
from rftlab.rl import fast_gpt2
from rftlab.rl.sampling import encode_pairs, response_logprobs
from rftlab.rl.train import apply_update

__all__ = ["PreferenceData", "encode_preferences", "evaluate", "pair_token_logps", "preference_step",
           "sft_chosen_step", "with_reference"]


@dataclass(frozen=True)
class PreferenceData:
    """N tokenized preference pairs (all tensors on one device)."""

    prompt_ids: torch.Tensor  # (N, P)
    prompt_mask: torch.Tensor  # (N, P)
    chosen_ids: torch.Tensor  # (N, Tw) y_w, right-padded
    chosen_mask: torch.Tensor  # (N, Tw)
    rejected_ids: torch.Tensor  # (N, Tl) y_l, right-padded
    rejected_mask: torch.Tensor  # (N, Tl)
    ref_chosen: torch.Tensor | None = None  # (N,) log π_ref(y_w|x), summed
    ref_rejected: torch.Tensor | None = None  # (N,) log π_ref(y_l|x), summed

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def len_chosen(self) -> torch.Tensor:
        """|y_w| per pair, (N,) float."""
        return self.chosen_mask.sum(-1).float()

    @property
    def len_rejected(self) -> torch.Tensor:
        return self.rejected_mask.sum(-1).float()

    def select(self, index: torch.Tensor | Sequence[int]) -> PreferenceData:
        """The pairs at ``index`` (any order, repeats allowed), padding columns trimmed to the longest kept."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.prompt_ids.device)
        fields = {name: None if value is None else value[index] for name, value in self.__dict__.items()}
        data = PreferenceData(**fields)
        return data._trimmed()

    def _trimmed(self) -> PreferenceData:
        def width(mask: torch.Tensor) -> int:
            return int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1

        p_cols = self.prompt_mask.any(0).nonzero()  # causal prompts are left-padded: keep the used columns
        p_lo, p_hi = (int(p_cols.min()), int(p_cols.max()) + 1) if len(p_cols) else (0, 1)
        w, l = width(self.chosen_mask), width(self.rejected_mask)
        return replace(self, prompt_ids=self.prompt_ids[:, p_lo:p_hi], prompt_mask=self.prompt_mask[:, p_lo:p_hi],
                       chosen_ids=self.chosen_ids[:, :w], chosen_mask=self.chosen_mask[:, :w],
                       rejected_ids=self.rejected_ids[:, :l], rejected_mask=self.rejected_mask[:, :l])

    def token_lists(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Unpadded (prompts, chosen, rejected) id lists, the input of ``rftlab.diagnostics``."""
        def rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
            return [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu(), strict=True)]

        return (rows(self.prompt_ids, self.prompt_mask), rows(self.chosen_ids, self.chosen_mask),
                rows(self.rejected_ids, self.rejected_mask))

    def to(self, device: torch.device | str) -> PreferenceData:
        return PreferenceData(**{k: None if v is None else v.to(device) for k, v in self.__dict__.items()})


def encode_preferences(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], *,
                       seq2seq: bool = False, add_eos: bool = False,
                       max_prompt_length: int | None = None) -> PreferenceData:
    """Tokenize N (prompt, chosen, rejected) string triples. ``add_eos`` appends EOS to both responses (a token
    they then share; off by default so that a one-word response is exactly one token)."""
    kw = {"seq2seq": seq2seq, "add_eos": add_eos, "max_prompt_length": max_prompt_length}
    p_ids, p_mask, w_ids, w_mask = encode_pairs(tokenizer, prompts, chosen, **kw)
    _, _, l_ids, l_mask = encode_pairs(tokenizer, prompts, rejected, **kw)
    return PreferenceData(p_ids, p_mask, w_ids, w_mask, l_ids, l_mask)


def pair_token_logps(model: nn.Module, data: PreferenceData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(y_t|x, y_<t) of chosen (N, Tw) and rejected (N, Tl), 0 on padding, from one forward
    (responses padded to a common width; rows 0..N−1 chosen, N..2N−1 rejected, row r's prompt r mod N).
    Differentiable; wrap in no_grad / inference_mode to score only."""
    n, width = len(data), max(data.chosen_ids.shape[1], data.rejected_ids.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]))

    responses = torch.cat([pad(data.chosen_ids), pad(data.rejected_ids)])
    masks = torch.cat([pad(data.chosen_mask), pad(data.rejected_mask)])
    logps = None
    lm = fast_gpt2.fused_model(model)
    if lm is not None and n:  # the pair's prompt once for both responses
        group = torch.arange(n, device=responses.device).repeat(2)
        logps = fast_gpt2.grouped_logprobs(lm, data.prompt_ids, data.prompt_mask, responses, masks, group)
    if logps is None:
        logps = response_logprobs(model, data.prompt_ids.repeat(2, 1), data.prompt_mask.repeat(2, 1), responses,
                                  masks)
    return logps[:n, : data.chosen_ids.shape[1]], logps[n:, : data.rejected_ids.shape[1]]


def _sequence_logps(model: nn.Module, data: PreferenceData) -> tuple[torch.Tensor, torch.Tensor]:
    lw, ll = pair_token_logps(model, data)
    return lw.sum(-1), ll.sum(-1)


def _scored(model: nn.Module, data: PreferenceData, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (x_w, x_l), (N,) each, in eval mode and inference mode, by chunks of ``batch_size``."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = [_sequence_logps(model, data.select(range(s, min(s + batch_size, len(data)))))
                     for s in range(0, len(data), batch_size)]
            x_w, x_l = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    finally:
        model.train(was_training)
    return x_w.clone(), x_l.clone()  # ordinary tensors: later steps use them in autograd graphs


def with_reference(reference: nn.Module, data: PreferenceData, batch_size: int = 64) -> PreferenceData:
    """``data`` with ``ref_chosen`` / ``ref_rejected`` = summed log-probs under the frozen ``reference``."""
    ref_chosen, ref_rejected = _scored(reference, data, batch_size)
    return replace(data, ref_chosen=ref_chosen, ref_rejected=ref_rejected)


def sft_chosen_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: PreferenceData,
                    max_grad_norm: float = 1.0) -> dict[str, float]:
    """One SFT step on the chosen responses: loss = −mean over chosen tokens of log π(y_w,t|x, y_w,<t)."""
    lw = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.chosen_ids, batch.chosen_mask)
    loss = -(lw.sum() / batch.chosen_mask.sum())
    grad_norm = apply_update(model, optimizer, loss, max_grad_norm)
    return {"loss/sft": loss.item(), "grad_norm": grad_norm}


def preference_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: PreferenceData, loss: str,
                    hparams: dict[str, float] | None = None, max_grad_norm: float = 0.0) -> dict[str, float]:
    """One optimizer step on the mean per-pair ``loss`` (a ``rftlab.preference`` name) over ``batch``.

    ``batch`` needs reference log-probs for reference-anchored losses (:func:`with_reference`). Returns the
    loss, the pre-clip gradient norm and the batch's TRL-style log-prob/reward means before the step.
    """
    x_w, x_l = _sequence_logps(model, batch)
    per_pair = preference_loss(loss, x_w, x_l, batch.ref_chosen, batch.ref_rejected, batch.len_chosen,
                               batch.len_rejected, **(hparams or {}))
    value = per_pair.mean()
    grad_norm = apply_update(model, optimizer, value, max_grad_norm)
    beta = (hparams or {}).get("beta", 0.1)
    summary = _summary(batch, x_w.detach(), x_l.detach(), beta, loss=value.detach())
    return {"loss": summary.pop("loss"), "grad_norm": grad_norm, **summary}


def _summary(data: PreferenceData, x_w: torch.Tensor, x_l: torch.Tensor, beta: float,
             loss: torch.Tensor | None = None) -> dict[str, float]:
    """TRL-style batch means, read back in one transfer (one device sync, not one per metric)."""
    out = {"logps/chosen": x_w.mean(), "logps/rejected": x_l.mean(),
           "logps/chosen_per_token": (x_w / data.len_chosen).mean(),
           "logps/rejected_per_token": (x_l / data.len_rejected).mean(),
           "logps/margin": (x_w - x_l).mean()}
    if loss is not None:
        out = {"loss": loss, **out}
    if data.ref_chosen is not None:
        r_w, r_l = beta * (x_w - data.ref_chosen), beta * (x_l - data.ref_rejected)
        out |= {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
                "rewards/margins": (r_w - r_l).mean(), "rewards/accuracies": (r_w > r_l).float().mean()}
    values = torch.stack([v.double() for v in out.values()]).tolist()
    return dict(zip(out, values, strict=True))


def evaluate(model: nn.Module, data: PreferenceData, beta: float = 0.1,
             batch_size: int = 64) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Held-out log-probs: (TRL-style means as in :func:`preference_step`, x_w (N,), x_l (N,))."""
    x_w, x_l = _scored(model, data, batch_size)
    return _summary(data, x_w, x_l, beta), x_w, x_l
