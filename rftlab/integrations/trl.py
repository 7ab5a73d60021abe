"""TrainerCallbacks that measure rftlab's two gradient pathologies inside TRL training runs.

``PairGradientCallback`` (``trl.DPOTrainer``): gradient entanglement (Yuan et al. 2024). On a fixed probe set of
B preference pairs it measures, per pair, with x_w = log π_θ(y_w|x) and x_l = log π_θ(y_l|x) (summed response-token
log-probs, as TRL sums them) and g_w = ∇_θ x_w, g_l = ∇_θ x_l,

    a = ‖g_w‖²,  b = ‖g_l‖²,  ρ = ⟨g_w, g_l⟩,  κ = ρ/√(ab)      (``rftlab.diagnostics.pair_gradient_stats``)

and classifies where the trainer's own loss L(x_w, x_l) moves the pair under gradient flow. With p = −∂L/∂x_w and
q = ∂L/∂x_l (``rftlab.preference.loss_partials``), dx_w ∝ p·a − q·ρ and dx_l ∝ p·ρ − q·b, so for p, q > 0 the chosen
log-prob falls iff ρ > c_w·a and the rejected one rises iff ρ > c_l·b, with (c_w, c_l) = (p/q, q/p)
(``rftlab.preference.threshold_coefficients``; DPO: (1, 1)). Logged every ``every_n_steps`` optimizer steps (and at
train begin and end) as a row of its own in the trainer's logs (``state.log_history`` and every reporter):

    grad/inner, grad/cosine, grad/norm_chosen, grad/norm_rejected    means over the B pairs of ρ, κ, ‖g_w‖, ‖g_l‖
    regime/ideal, regime/chosen_down, regime/rejected_up, regime/both, regime/inactive    shares of the B pairs

``RewardStdCallback`` (``trl.GRPOTrainer``): vanishing gradients in RL finetuning (Razin et al. 2024). For every
generation batch, B prompts × G = ``num_generations`` completions, it takes the reward TRL builds advantages from,
r = Σ_k w_k r_k (``reward_weights``; NaN where every reward function returned None), and per prompt the
unbiased std σ over its G completions. A prompt with σ = 0 gets zero advantage under GRPO's group baseline, hence
zero gradient. Logged with TRL's own metrics (same rows, same averaging over the logging window):

    rewards/frac_std_zero          share of prompts whose G rewards are all equal (TRL's frac_reward_zero_std)
    rewards/frac_std_below_<t>     share with σ < t, for each threshold t > 0 (default 0.05)
    rewards/group_std_mean         mean over prompts of σ

Both write an rftlab-style table when training ends, on the main process only, atomically:
``<output_dir>/rftlab/pair_gradients.parquet`` (one row per measured step and probe pair) and
``<output_dir>/rftlab/prompt_rewards.parquet`` (one row per step and prompt group).

Usage::

    trainer = DPOTrainer(model=..., ref_model=..., args=DPOConfig(...), train_dataset=..., processing_class=tok)
    trainer.add_callback(PairGradientCallback(trainer, n_pairs=32, every_n_steps=50))
    trainer.train()

    trainer = GRPOTrainer(model=..., reward_funcs=[...], args=GRPOConfig(...), train_dataset=...)
    trainer.add_callback(RewardStdCallback(trainer, thresholds=(0.0, 0.05)))
    trainer.train()

TRL is optional: this module imports only ``transformers`` at import time (a core dependency) and TRL inside the
constructors, which raise :class:`~rftlab.errors.RftlabError` when it is missing. Written against TRL 1.16; the
private TRL attributes relied on are named where they are used.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import Trainer, TrainerCallback

from rftlab.errors import RftlabError
from rftlab.preference import REGIMES, classify_regimes

if TYPE_CHECKING:
    import pandas as pd
    import torch

__all__ = ["PairGradientCallback", "RewardStdCallback", "dpo_loss_method", "group_std_stats"]

PAIR_TABLE = "rftlab/pair_gradients.parquet"
PROMPT_TABLE = "rftlab/prompt_rewards.parquet"

# Tokenized columns of DPOTrainer's processed dataset: TRL >= 1.0, then the 0.x layout.
_ID_COLUMNS = (("prompt_ids", "chosen_ids", "rejected_ids"),
               ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # present with precompute_ref_log_probs=True


def _require_trl(who: str) -> None:
    try:
        import trl  # noqa: F401  (the real TRL: this module's absolute import does not find itself)
    except ImportError:
        raise RftlabError(f"{who} needs trl: pip install 'rftlab[trl]'") from None


def _log_row(trainer: Trainer, stats: dict[str, float]) -> None:
    """Append ``stats`` as its own row of ``trainer.state.log_history`` and hand it to every reporter (on_log).

    Calls ``transformers.Trainer.log`` itself rather than the trainer's override: TRL's ``log`` merges and clears
    the metrics it has buffered since the last logging step (``self._metrics``), so calling it from a callback
    would move TRL's own metrics into this row and out of the regular one. The base method only adds ``epoch``
    and the current ``step``. Editing ``logs`` in ``on_log`` would not work: the row is copied into log_history
    before callbacks see it.

    The callback handler's ``on_log`` clears ``control.should_log``; called from ``on_step_end`` (after
    DefaultFlowCallback has set it) that would cancel the trainer's own log of this step, so the flag is restored.
    """
    control = trainer.control
    should_log = control.should_log
    Trainer.log(trainer, dict(stats))
    control.should_log = trainer.control.should_log = should_log


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` to ``path`` through a temporary file and a rename, so readers never see half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when writing failed
    return path


# ============================================================================================== DPO
def dpo_loss_method(args: Any) -> tuple[str, dict[str, float], str | None]:
    """The rftlab preference method (``rftlab.preference.METHODS``) matching a TRL ``DPOConfig``'s loss.

    Returns (name, hyperparameters, caveat): the caveat is None when the thresholds are those of TRL's loss, else
    one line saying what is approximated. Mapping of ``loss_type`` (with ``loss_weights`` w):

    - ``["sigmoid"]`` → ``"dpo"`` (β): thresholds (1, 1);
    - ``["ipo"]`` → ``"ipo"`` (β; per-token averaged log-ratios, as TRL): (|y_l|/|y_w|, |y_w|/|y_l|) while the
      averaged margin is below 1/(2β);
    - ``["hinge"]`` → ``"slic"`` (β, no SFT term; reference-offset margin, as TRL);
    - ``["sigmoid", "sft"]`` → ``"rpo"`` (β, α = w_sft/w_sigmoid; TRL's RPO recipe): TRL's SFT term is the NLL
      averaged over all chosen tokens of the batch, rftlab's over each pair's own tokens, so c_w = 1 + α/(|y_w|·βσ)
      here against TRL's 1 + α/(mean batch |y_w|·βσ), σ = σ(−β·margin): equal when the chosen lengths are;
    - anything else (exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
      discopop, sigmoid_norm, other mixtures): rftlab has no such loss, so DPO's thresholds (1, 1) stand in.

    ``f_divergence_type`` other than reverse KL, ``ld_alpha`` (LD-DPO) and ``use_weighting`` (WPO) change TRL's
    gradient in ways the general form here does not model; they are named in the caveat.
    """
    loss_type = getattr(args, "loss_type", "sigmoid")
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)  # a plain string in TRL 0.x
    weights = list(getattr(args, "loss_weights", None) or [1.0] * len(types))
    beta = float(getattr(args, "beta", 0.1))
    caveats = []
    divergence = getattr(args, "f_divergence_type", "reverse_kl")
    divergence = getattr(divergence, "value", divergence)  # an enum in older TRL
    if divergence != "reverse_kl":
        caveats.append(f"f_divergence_type={divergence!r} (thresholds assume reverse KL)")
    if getattr(args, "ld_alpha", None) is not None:
        caveats.append("ld_alpha (log-probs are taken as plain sums)")
    if getattr(args, "use_weighting", False):
        caveats.append("use_weighting (WPO weights are ignored)")
    by_type = dict(zip(types, weights, strict=True)) if len(set(types)) == len(types) else {}
    if types == ["sigmoid"]:
        name, hparams = "dpo", {"beta": beta}
    elif types == ["ipo"]:
        name, hparams = "ipo", {"beta": beta}
    elif types == ["hinge"]:
        name, hparams = "slic", {"beta": beta, "sft_weight": 0.0}
    elif set(by_type) == {"sigmoid", "sft"} and by_type["sigmoid"] > 0:
        name, hparams = "rpo", {"beta": beta, "alpha": by_type["sft"] / by_type["sigmoid"]}
    else:
        name, hparams = "dpo", {"beta": beta}
        caveats.insert(0, f"loss_type={types} has no rftlab counterpart; DPO's thresholds (1, 1) are used")
    return name, hparams, ("; ".join(caveats) or None)


def _truncate(prompt: list[int], response: list[int], max_length: int | None,
              mode: str) -> tuple[list[int], list[int]]:
    """(prompt, response) as TRL's DataCollatorForPreference scores them: prompt + response cut to ``max_length``
    (keep_start: the head; keep_end: the tail); the sequence's first token is never scored (log-probs are shifted),
    so a tail cut into the response moves its first kept token into the prompt."""
    seq, is_response = prompt + response, [False] * len(prompt) + [True] * len(response)
    if max_length is not None and len(seq) > max_length:
        cut = slice(None, max_length) if mode != "keep_end" else slice(-max_length, None)
        seq, is_response = seq[cut], is_response[cut]
    start = max(1, is_response.index(True)) if True in is_response else len(seq)
    return seq[:start], seq[start:]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode_text_pairs(tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str],
                       rejected: Sequence[str]) -> tuple[list[list[int]], ...]:
    """Token ids of text pairs, tokenized as DPOTrainer prepares a plain-text dataset: EOS appended to each
    response that lacks it, prompt and prompt+response tokenized whole, the response starting where the two
    tokenizations diverge."""
    eos = tokenizer.eos_token or ""
    out: tuple[list[list[int]], ...] = ([], [], [])
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        c, r = (s if s.endswith(eos) else s + eos for s in (c, r))
        p_ids, pc_ids, pr_ids = (tokenizer(text=t)["input_ids"] for t in (p, p + c, p + r))
        start = min(_common_prefix(p_ids, pc_ids), _common_prefix(p_ids, pr_ids))
        out[0].append(list(p_ids[:start]))
        out[1].append(list(pc_ids[start:]))
        out[2].append(list(pr_ids[start:]))
    return out


def _probe_from_dataset(dataset: Any, n_pairs: int) -> tuple[list, list, list, np.ndarray | None]:
    """The first ``n_pairs`` rows of DPOTrainer's processed train dataset: prompt/chosen/rejected token ids and,
    when TRL precomputed them, the reference log-probs (2, n) in the same (truncated) convention."""
    rows = list(islice(iter(dataset), n_pairs))
    if not rows:
        raise RftlabError("the trainer's train dataset is empty: pass pairs=(prompts, chosen, rejected).")
    columns = next((c for c in _ID_COLUMNS if all(k in rows[0] for k in c)), None)
    if columns is None:
        raise RftlabError(f"the train dataset has no tokenized columns {_ID_COLUMNS[0]} (vision data is not "
                          "tokenized up front): pass pairs=(prompts, chosen, rejected).")
    prompts, chosen, rejected = ([list(row[k]) for row in rows] for k in columns)
    refs = None
    if all(k in rows[0] for k in _REF_COLUMNS):
        refs = np.array([[float(row[k]) for row in rows] for k in _REF_COLUMNS])
    return prompts, chosen, rejected, refs


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _sequence_logps(model: torch.nn.Module, prompts: list, responses: list, chunk: int) -> np.ndarray:
    """log π(y|x) summed over response tokens, (n,) float64, no gradient; batched and padded exactly as
    ``pair_gradient_stats`` pads (left-padded prompt, right-padded response), so policy and reference log-probs
    of a pair come from the same inputs."""
    import torch

    from rftlab.diagnostics import _pad_batch
    from rftlab.models import unwrap
    from rftlab.rl.sampling import response_logprobs

    pad = unwrap(model).config.pad_token_id
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            batch = _pad_batch(prompts[part], responses[part], 0 if pad is None else int(pad), False, device)
            out.append(response_logprobs(model, *batch).sum(-1).double().cpu())
    return torch.cat(out).numpy()


class PairGradientCallback(TrainerCallback):
    """Per-pair gradient entanglement of a probe set during ``trl.DPOTrainer`` training (module docstring).

    Args:
        trainer: the DPOTrainer; the callback reads its model, reference, config and train dataset and logs
            through it. Add it with ``trainer.add_callback(callback)``.
        pairs: explicit probe pairs ``(prompts, chosen, rejected)``, either token-id lists (used as given, up to
            TRL's ``max_length`` truncation) or strings (tokenized like DPOTrainer's plain-text data, EOS appended).
            Default: the first ``n_pairs`` rows of the trainer's processed train dataset (its ``prompt_ids``,
            ``chosen_ids``, ``rejected_ids`` columns).
        n_pairs: probe size B when ``pairs`` is not given.
        every_n_steps: measure when ``global_step`` is a multiple of it (and at train begin and end); default the
            trainer's ``logging_steps``.
        params: the parameter subset θ of the gradients (``rftlab.diagnostics.select_parameters``): "all", "last",
            "embeddings", "lora" or a callable on parameter names. Default "lora" for a peft model, else "all".
        method: ``pair_gradient_stats``'s method, "fast" (hook-based; Linear, Conv1D, Embedding, LayerNorm and
            RMS-norm modules: GPT-2, Llama-style and LoRA models) or "exact" (autograd, any causal model).
        loss, loss_hparams: the rftlab preference method whose thresholds classify the regimes; default
            :func:`dpo_loss_method` of the trainer's config (a fallback to DPO's is warned about once).
        chunk_size, rtol: passed to ``pair_gradient_stats``; rtol also sets the tie tolerance of the regimes.
        write_table: write ``<output_dir>/rftlab/pair_gradients.parquet`` when training ends.

    Reference log-probs (needed by every mapped loss but DPO, whose thresholds are (1, 1) whatever the reference)
    come from TRL's precomputed columns when the probe is the train dataset, else from ``trainer.ref_model``, else
    (peft) the policy with its adapter disabled (or TRL's frozen "ref" adapter), else the policy at train begin
    (TRL's reference when it precomputes without a ref model); computed once, or at every measurement with
    ``sync_ref_model``.

    Table columns: step, pair, norm_chosen, norm_rejected, inner, cosine, regime (loss-aware, see
    :func:`classify_regimes`), logp_chosen, logp_rejected, c_chosen, c_rejected (the thresholds p/q and q/p).
    ``table`` returns the rows measured so far. Measurement runs on the main process only (with DDP the replicas
    are equal); sharded parameters (FSDP, ZeRO-3) are not supported. Each measurement costs one forward and one
    backward over 2B sequences ("fast") and leaves parameter gradients untouched.
    """

    def __init__(self, trainer: Trainer, *, pairs: tuple[Sequence, Sequence, Sequence] | None = None,
                 n_pairs: int = 32, every_n_steps: int | None = None, params: Any = None, method: str = "fast",
                 loss: str | None = None, loss_hparams: dict[str, float] | None = None, chunk_size: int = 32,
                 rtol: float = 1e-5, write_table: bool = True) -> None:
        _require_trl(type(self).__name__)
        from accelerate.utils import is_peft_model

        from rftlab.preference import get_method

        if every_n_steps is not None and every_n_steps < 1:
            raise RftlabError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        if n_pairs < 1:
            raise RftlabError(f"n_pairs must be at least 1, got {n_pairs}.")
        self.trainer = trainer
        args = trainer.args
        self.every_n_steps = every_n_steps
        self.method, self.chunk_size, self.rtol, self.write_table = method, chunk_size, rtol, write_table
        self.params = params if params is not None else ("lora" if is_peft_model(trainer.model) else "all")

        if loss is None:
            loss, hparams, self.loss_caveat = dpo_loss_method(args)
            if self.loss_caveat:
                warnings.warn(f"PairGradientCallback: {self.loss_caveat}.", stacklevel=2)
        else:
            hparams, self.loss_caveat = {}, None
        self.loss = get_method(loss).name
        self.loss_hparams = {**hparams, **(loss_hparams or {})}

        # probe pairs, truncated as TRL's collator truncates the training sequences
        refs = None
        if pairs is None:
            prompts, chosen, rejected, refs = _probe_from_dataset(trainer.train_dataset, n_pairs)
        else:
            prompts, chosen, rejected = (list(x) for x in pairs)
            if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
                raise RftlabError("pairs must be three non-empty lists of equal length: prompts, chosen, rejected.")
            texts = [isinstance(x, str) for x in (*prompts, *chosen, *rejected)]
            if all(texts):
                tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
                prompts, chosen, rejected = _encode_text_pairs(tokenizer, prompts, chosen, rejected)
            elif any(texts):
                raise RftlabError("pairs must be all strings or all token-id lists, not a mixture.")
            prompts, chosen, rejected = ([list(map(int, x)) for x in xs] for xs in (prompts, chosen, rejected))
        max_length, mode = getattr(args, "max_length", None), getattr(args, "truncation_mode", "keep_start")
        cut_w = [_truncate(p, r, max_length, mode) for p, r in zip(prompts, chosen, strict=True)]
        cut_l = [_truncate(p, r, max_length, mode) for p, r in zip(prompts, rejected, strict=True)]
        if any(not r for _, r in cut_w + cut_l):
            raise RftlabError(f"a probe pair has no response token left after truncation to max_length={max_length}.")
        if [p for p, _ in cut_w] != [p for p, _ in cut_l]:
            raise RftlabError("truncation_mode='keep_end' cut the prompt of a probe pair differently for its chosen "
                              "and rejected responses; pass shorter probe pairs or use truncation_mode='keep_start'.")
        self._prompts = [p for p, _ in cut_w]
        self._chosen, self._rejected = [r for _, r in cut_w], [r for _, r in cut_l]
        self.n_pairs = len(self._chosen)
        self._len = (np.array([len(r) for r in self._chosen], float), np.array([len(r) for r in self._rejected], float))
        self._ref: np.ndarray | None = refs
        self._ref_from_dataset = refs is not None
        method_info = get_method(self.loss)
        # TRL's hinge uses the reference offset too; DPO's thresholds do not depend on the reference at all
        self._use_ref = (method_info.needs_ref or self.loss == "slic") and self.loss != "dpo"
        self._frames: list[pd.DataFrame] = []
        self._last_step: int | None = None

    # ---------------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, **kwargs):
        if self.every_n_steps is None:
            self.every_n_steps = max(1, int(state.logging_steps or 1))
        self._measure(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._measure(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._measure(state)  # the final model, unless its step was just measured
        if self.write_table and self._frames and state.is_world_process_zero:
            _atomic_parquet(self.table, Path(args.output_dir) / PAIR_TABLE)

    # ------------------------------------------------------------------------------------ measuring
    @property
    def probe(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """The probe pairs as measured: prompt, chosen and rejected token ids (after TRL's truncation)."""
        return self._prompts, self._chosen, self._rejected

    @property
    def ref_logps(self) -> np.ndarray | None:
        """(2, B) reference log-probs of the chosen and rejected probe responses, once known (None for DPO)."""
        return self._ref

    @property
    def table(self) -> pd.DataFrame:
        """Every measured (step, pair) row so far, in the column order of the module docstring."""
        import pandas as pd

        columns = ["step", "pair", "norm_chosen", "norm_rejected", "inner", "cosine", "regime", "logp_chosen",
                   "logp_rejected", "c_chosen", "c_rejected"]
        if not self._frames:
            return pd.DataFrame(columns=columns)
        return pd.concat(self._frames, ignore_index=True)[columns]

    def _policy(self) -> torch.nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _reference_logps(self, state) -> np.ndarray | None:
        """(2, B) reference log-probs of the probe responses, computed once (see the class docstring)."""
        if not self._use_ref or (self._ref is not None and not getattr(self.trainer.args, "sync_ref_model", False)):
            return self._ref
        from accelerate.utils import is_peft_model

        trainer, policy = self.trainer, self._policy()
        ref_model = getattr(trainer, "ref_model", None)
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        if ref_model is not None:
            model = trainer.accelerator.unwrap_model(ref_model)
        elif is_peft_model(policy):
            model = policy
            try:  # TRL's own switch: its "ref" adapter when it made one, else every adapter disabled
                from trl.trainer.utils import use_adapter

                context = use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None)
            except ImportError:
                context = policy.disable_adapter()
        else:
            if state.global_step > 0:
                warnings.warn("PairGradientCallback: no reference model and no precomputed reference log-probs for "
                              f"the probe; the policy at step {state.global_step} stands in for the reference.",
                              stacklevel=2)
            model = policy
        with context:
            self._ref = np.stack([_sequence_logps(model, self._prompts, self._chosen, self.chunk_size),
                                  _sequence_logps(model, self._prompts, self._rejected, self.chunk_size)])
        return self._ref

    def _measure(self, state) -> None:
        if state.global_step == self._last_step or not state.is_world_process_zero:
            return
        import torch

        from rftlab.diagnostics import pair_gradient_stats
        from rftlab.preference import loss_partials

        self._last_step = state.global_step
        ref = self._reference_logps(state)
        policy = self._policy()
        frame = pair_gradient_stats(policy, self._prompts, self._chosen, self._rejected, params=self.params,
                                    method=self.method, chunk_size=self.chunk_size, rtol=self.rtol)
        x_w = torch.tensor(frame["logp_chosen"].to_numpy())
        x_l = torch.tensor(frame["logp_rejected"].to_numpy())
        # DPO's p = q = β·σ(−β·margin) for any reference, so its own log-probs serve (c = 1 exactly)
        ref_w, ref_l = (x_w, x_l) if ref is None else (torch.tensor(ref[0]), torch.tensor(ref[1]))
        d_w, d_l = loss_partials(self.loss, x_w, x_l, ref_w, ref_l, torch.tensor(self._len[0]),
                                 torch.tensor(self._len[1]), **self.loss_hparams)
        p, q = (-d_w).numpy(), d_l.numpy()
        a, b = frame["norm_chosen"].to_numpy() ** 2, frame["norm_rejected"].to_numpy() ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            frame["c_chosen"], frame["c_rejected"] = p / q, q / p
        frame["regime"] = classify_regimes(a, b, frame["inner"].to_numpy(), p, q, self.rtol)
        frame.insert(0, "pair", np.arange(len(frame)))
        frame.insert(0, "step", state.global_step)
        self._frames.append(frame)
        shares = frame["regime"].value_counts(normalize=True)
        stats = {
            "grad/inner": float(frame["inner"].mean()),
            "grad/cosine": float(np.nanmean(frame["cosine"])) if frame["cosine"].notna().any() else math.nan,
            "grad/norm_chosen": float(frame["norm_chosen"].mean()),
            "grad/norm_rejected": float(frame["norm_rejected"].mean()),
            **{f"regime/{r}": float(shares.get(r, 0.0)) for r in REGIMES},
        }
        _log_row(self.trainer, stats)


# ============================================================================================= GRPO
def _prompt_text(prompt: Any) -> str:
    """A prompt as one string: plain text as is, conversational messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, default=str)


def group_std_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prompt mean, unbiased std and exact-zero flag of (B, G) rewards, NaN-aware as TRL's ``nanstd``.

    NaN entries (completions no reward function scored) are left out; σ is nan with fewer than 2 scored
    completions. ``zero`` (B,) bool: all scored rewards of the prompt are equal (``zero_std_groups`` on the rewards
    with NaN replaced by the group mean); a prompt with none scored is not zero-std, as in TRL.
    """
    import torch

    from rftlab.rl.losses import zero_std_groups

    rewards = rewards.double()
    count = (~rewards.isnan()).sum(-1)
    mean = rewards.nanmean(-1)
    var = (rewards - mean[:, None]).pow(2).nanmean(-1) * count / (count - 1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))
    zero = zero_std_groups(torch.where(rewards.isnan(), mean[:, None], rewards))
    return mean, std, zero


class RewardStdCallback(TrainerCallback):
    """Per-prompt reward std during ``trl.GRPOTrainer`` training (module docstring).

    Args:
        trainer: the GRPOTrainer. The constructor wraps its ``_calculate_rewards`` (a private TRL method, 1.16
            ``grpo_trainer.py`` line 1579) so every generation batch's rewards pass through the callback; add the
            callback with ``trainer.add_callback(callback)`` for the table to be written.
        thresholds: σ thresholds; 0.0 gives ``rewards/frac_std_zero`` (exact equality of the G rewards), each
            t > 0 ``rewards/frac_std_below_<t>`` (σ < t; ``<t>`` formatted with ``:g``).
        write_table: write ``<output_dir>/rftlab/prompt_rewards.parquet`` (step, prompt, reward_mean, reward_std,
            zero_std) when training ends; ``step`` is the optimizer step the generation batch first trains.

    Why wrap ``_calculate_rewards``: it returns the rewards of every reward function for the whole generation batch
    gathered over processes, (B·G, K) with each prompt's G completions consecutive (TRL's RepeatSampler), once per
    generation. A wrapper around the user's reward functions would see one process's share only (a prompt's G
    completions can be split across processes), never reward models, and each function alone. The total is formed
    as TRL does (1.16 ``grpo_trainer.py`` lines 2763 and 2826): r = nansum_k w_k r_k, NaN where every function
    returned None. The values go into TRL's metric buffer (``trainer._metrics[mode]``, the same list TRL's
    ``frac_reward_zero_std`` goes to), so they appear in the same log rows, averaged over the same window, and
    under ``eval_`` names during evaluation.

    Agreement with TRL's ``frac_reward_zero_std``: equal under the default ``multi_objective_aggregation=
    "sum_then_normalize"`` with ``scale_rewards`` "group" or "none" (TRL tests σ ≈ 0 with ``torch.isclose``, here
    the rewards are compared exactly). With ``scale_rewards="batch"`` TRL's fraction is of the whole batch's std
    (0 or 1), while these statistics stay per prompt: there a prompt with σ = 0 still gets zero advantage from the
    group-mean baseline. With ``multi_objective_aggregation="normalize_then_sum"`` TRL standardises each reward
    function per prompt and centres the sum on the batch mean, so σ = 0 no longer implies zero advantage; σ here
    stays that of the raw weighted sum.
    """

    def __init__(self, trainer: Trainer, *, thresholds: Sequence[float] = (0.0, 0.05),
                 write_table: bool = True) -> None:
        _require_trl(type(self).__name__)
        missing = [name for name in ("_calculate_rewards", "_metrics", "num_generations", "reward_weights")
                   if not hasattr(trainer, name)]
        if missing:
            raise RftlabError(f"RewardStdCallback needs a trl.GRPOTrainer; {type(trainer).__name__} has no "
                              f"{', '.join(missing)}.")
        if any(not t >= 0 for t in thresholds):
            raise RftlabError(f"reward std thresholds must be >= 0, got {list(thresholds)}.")
        self.trainer = trainer
        self.thresholds = sorted(set(float(t) for t in thresholds))
        self.write_table = write_table
        self._rows: list[dict[str, Any]] = []
        self._warned = False
        original = trainer._calculate_rewards
        signature = inspect.signature(original)

        @functools.wraps(original)
        def calculate_rewards(*args: Any, **kwargs: Any) -> torch.Tensor:
            rewards_per_func = original(*args, **kwargs)
            self._record(signature.bind(*args, **kwargs).arguments["prompts"], rewards_per_func)
            return rewards_per_func

        # an instance attribute shadows the method; GRPOTrainer calls it as self._calculate_rewards(...)
        trainer._calculate_rewards = calculate_rewards

    @staticmethod
    def key(threshold: float) -> str:
        """Log key of a threshold: ``rewards/frac_std_zero`` for 0, else ``rewards/frac_std_below_<t>``."""
        return "rewards/frac_std_zero" if threshold == 0 else f"rewards/frac_std_below_{threshold:g}"

    def _record(self, prompts: list, rewards_per_func: torch.Tensor) -> None:
        trainer = self.trainer
        mode = "train" if trainer.model.training else "eval"  # TRL's own rule in _generate_and_score_completions
        g = trainer.num_generations if mode == "train" else (getattr(trainer, "num_generations_eval", None)
                                                               or trainer.num_generations)
        per_func = rewards_per_func.detach().float().cpu()
        total = (per_func * trainer.reward_weights.detach().float().cpu()[None]).nansum(-1)
        total[per_func.isnan().all(-1)] = math.nan
        if total.numel() % g:
            self._warn_once(f"{total.numel()} rewards do not split into groups of num_generations={g}; skipped.")
            return
        if trainer.accelerator.num_processes > 1:  # the rewards are gathered already, the prompts not yet
            from accelerate.utils import gather_object

            prompts = gather_object(list(prompts))
        groups = total.view(-1, g)
        mean, std, zero = group_std_stats(groups)
        metrics = trainer._metrics[mode]
        for t in self.thresholds:
            share = zero if t == 0 else std < t  # nan σ (fewer than 2 scored) counts as not below
            metrics[self.key(t)].append(share.double().mean().item())
        metrics["rewards/group_std_mean"].append(std.nanmean().item())
        if mode != "train":
            return
        firsts = prompts[::g]
        if len(firsts) != len(groups) or any(prompts[i * g:(i + 1) * g] != [p] * g for i, p in enumerate(firsts)):
            self._warn_once("a group of num_generations consecutive completions mixes prompts; its prompt column "
                            "shows the group's first prompt.")
        step = trainer.state.global_step + 1  # generation runs inside the step it feeds, before the increment
        for prompt, m, s, z in zip(firsts, mean.tolist(), std.tolist(), zero.tolist(), strict=False):
            self._rows.append({"step": step, "prompt": _prompt_text(prompt), "reward_mean": m, "reward_std": s,
                               "zero_std": z})

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            warnings.warn(f"RewardStdCallback: {message}", stacklevel=3)
            self._warned = True

    @property
    def table(self) -> pd.DataFrame:
        """Every recorded (step, prompt group) row of training so far."""
        import pandas as pd

        return pd.DataFrame(self._rows, columns=["step", "prompt", "reward_mean", "reward_std", "zero_std"])

    def on_train_end(self, args, state, control, **kwargs):
        if self.write_table and self._rows and state.is_world_process_zero:
            _atomic_parquet(self.table, Path(args.output_dir) / PROMPT_TABLE)
