"""dpo-step: one DPO optimizer step on 16 preference pairs — rftlab vs TRL's DPOTrainer vs a minimal loop.

Data: 16 (prompt, chosen, rejected) triples cut from CPython's help text at word boundaries, prompts ≈16
tokens, responses ≈U[16, 32) tokens plus the EOS TRL appends (:func:`benchmarks.common.preference_texts`).
Every side processes exactly the same token ids (checked against TRL's tokenized dataset) and the same 16
pairs at every step. Models: one seeded GPT-2 per size (``2x128``, ``4x256``); every side trains its own copy
of it, against a frozen copy as the reference. DPO with β = 0.1, AdamW (the fused kernel on every side, TRL's
default ``adamw_torch_fused``), lr 1e-6, no gradient clipping beyond what each side does by default.

What each side does per step:

- ``rftlab``: ``with_reference`` (the reference's summed log-probs of the 16 pairs, inference mode) then
  ``preference_step(loss="dpo")`` (policy log-probs, loss, backward, AdamW; the pre-clip gradient norm and
  TRL's metrics read back once). rftlab computes reference log-probs once per pair (``PreferenceData``) and
  reuses them every epoch, so a step pays its update plus 1/E of a reference pass over its pairs: the row
  ``rftlab`` uses E = 7.5, the epochs of the margin-losses default preset (120 steps × 16 pairs over 256
  pairs; entanglement-sentiment's default is 12.5), and ``rftlab-1epoch`` the same measured steps with E = 1
  (the reference pass paid in full at every step — the most any run pays). Both passes are timed at every
  step. On a GPT-2 both take the fused path (``rftlab.rl.fast_gpt2``): each prompt run once for its two
  responses, no compute on padding, the LM head only on scored positions.
- ``trl``: ``DPOTrainer.train()`` timed per optimizer step by a callback (``TrainerSteps``: ``train()`` in chunks,
  the first step of each chunk untimed), so a step is everything its loop does between two updates: collate the
  batch (prompt+chosen and prompt+rejected rows padded to one width), a policy forward of the 32 rows and a
  reference forward (no grad) with TRL's chunked log-prob head, the loss and metrics, backward, gradient clipping
  to 1.0, AdamW, scheduler and callbacks. fp32 rows: ``bf16=False, gradient_checkpointing=False``; bf16 rows:
  TRL's defaults (bf16 autocast and gradient checkpointing). ``ref_model`` is passed explicitly (a config-built
  model has no hub name to reload). Logging is off (``logging_strategy="no"``), no checkpoints, no tqdm.
- ``trl-precompute``: the same with ``precompute_ref_log_probs=True``: the reference runs once over the
  dataset when the trainer is built, which is not timed, so its steps do no reference forward at all — the
  reference cost left out entirely, less than the ``rftlab`` row pays.
- ``minimal``: a hand-written loop on pre-padded tensors: the 32 [prompt ; response] rows right-padded to one
  width, policy forward, log-softmax and gather over all positions, reference forward under no_grad, the DPO
  loss, ``zero_grad``, backward, AdamW.

bf16 rows run each side under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (TRL through its ``bf16=True``).
Throughput: pairs per second = 16 / median step time.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from benchmarks import common

NAME = "dpo-step"
BATCH, BETA, LR = 16, 0.1, 1e-6
# rftlab reuses a pair's reference log-probs every epoch: the margin-losses default preset trains 120 steps of 16
# on 256 pairs = 7.5 epochs (entanglement-sentiment's: 200 × 32 on 512 = 12.5)
EPOCHS = 7.5


def encode(texts: list[tuple[str, str, str]]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids as TRL's DPOTrainer makes them: prompt ids, and prompt + response + EOS split after the prompt."""
    tok = common.tokenizer()
    prompts, chosen, rejected = [], [], []
    for prompt, good, bad in texts:
        p = tok(prompt)["input_ids"]
        for response, out in ((good, chosen), (bad, rejected)):
            full = tok(prompt + response + tok.eos_token)["input_ids"]
            if full[: len(p)] != p:
                raise RuntimeError(f"prompt {prompt!r} does not tokenize as a prefix of prompt + response")
            out.append(full[len(p):])
        prompts.append(p)
    return prompts, chosen, rejected


def _pad(rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r)
        mask[i, cols] = 1
    return ids, mask


def preference_data(prompts, chosen, rejected):
    """rftlab's PreferenceData of the pairs (prompts left-padded, responses right-padded)."""
    from rftlab.preference_train import PreferenceData

    return PreferenceData(*_pad(prompts, True), *_pad(chosen, False), *_pad(rejected, False))


# ------------------------------------------------------------------------------------------------ rftlab
class Rftlab:
    """rftlab's step: reference log-probs of the batch (inference mode), then ``preference_step``.

    :meth:`step` runs both and keeps their seconds apart (``reference_s``, ``update_s``), so one measurement
    gives the step with the reference pass amortised over any number of epochs (:meth:`unit`).
    """

    def __init__(self, model, reference, data, precision: str) -> None:
        from rftlab.rl.train import optimizer_for

        self.model, self.reference, self.data, self.precision = model, reference, data, precision
        self.optimizer = optimizer_for(model, LR)
        self.reference_s: list[float] = []
        self.update_s: list[float] = []

    def step(self) -> dict[str, float]:
        from rftlab.preference_train import preference_step, with_reference

        with common.precision_context(self.precision):
            start = time.perf_counter()
            batch = with_reference(self.reference, self.data)
            middle = time.perf_counter()
            out = preference_step(self.model, self.optimizer, batch, "dpo", {"beta": BETA})
        self.reference_s.append(middle - start)
        self.update_s.append(time.perf_counter() - middle)
        return out

    def unit(self, steps: int, epochs: float) -> Callable[[], list[float]]:
        """``steps`` steps; each one's update seconds + reference seconds / ``epochs``."""
        def run() -> list[float]:
            for _ in range(steps):
                self.step()
            return [u + r / epochs for u, r in zip(self.update_s[-steps:], self.reference_s[-steps:], strict=True)]
        return run

    def times(self, epochs: float, skip: int) -> list[float]:
        """Per-step seconds of the steps after the first ``skip``, the reference amortised over ``epochs``."""
        return [u + r / epochs for u, r in zip(self.update_s[skip:], self.reference_s[skip:], strict=True)]


# ------------------------------------------------------------------------------------------------ minimal
class Minimal:
    """A hand-written DPO loop: policy and reference forwards over 2N padded [prompt ; response] rows."""

    def __init__(self, model, reference, prompts, chosen, rejected, precision: str) -> None:
        self.model, self.reference, self.precision = model, reference, precision
        self.n = len(prompts)
        rows = [p + r for p, r in zip(prompts + prompts, chosen + rejected, strict=True)]
        self.ids, self.mask = _pad(rows, left=False)
        self.labels = torch.zeros_like(self.ids)  # 1 on response tokens
        for i, (p, r) in enumerate(zip(prompts + prompts, chosen + rejected, strict=True)):
            self.labels[i, len(p): len(p) + len(r)] = 1
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def logps(self, model) -> torch.Tensor:
        logits = model(input_ids=self.ids, attention_mask=self.mask).logits[:, :-1].float()
        token = logits.log_softmax(-1).gather(-1, self.ids[:, 1:, None]).squeeze(-1)
        return (token * self.labels[:, 1:]).sum(-1)

    def loss(self) -> torch.Tensor:
        x = self.logps(self.model)
        with torch.no_grad():
            ref = self.logps(self.reference)
        n = self.n
        return -F.logsigmoid(BETA * ((x[:n] - ref[:n]) - (x[n:] - ref[n:]))).mean()

    def step(self) -> float:
        with common.precision_context(self.precision):
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


# ------------------------------------------------------------------------------------------------ TRL
def trl_trainer(model, reference, texts, precision: str, precompute: bool, max_steps: int, out_dir: str):
    """TRL's DPOTrainer on ``texts`` (fp32: bf16 and gradient checkpointing off; bf16: TRL's defaults)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    common.quiet_trl()
    kwargs = dict(output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=LR,
                  beta=BETA, report_to="none", logging_strategy="no", save_strategy="no", use_cpu=True,
                  disable_tqdm=True, precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0)
    if precision == "fp32":
        kwargs |= dict(bf16=False, gradient_checkpointing=False)
    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in texts])
    trainer = DPOTrainer(model=model, ref_model=reference, args=DPOConfig(**kwargs), train_dataset=dataset,
                         processing_class=common.tokenizer())
    return trainer


def check_trl_tokens(trainer, prompts, chosen, rejected) -> None:
    """Both sides must see the same ids: TRL's tokenized dataset against ours."""
    data = trainer.train_dataset
    theirs = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in data]
    if theirs != list(zip(prompts, chosen, rejected, strict=True)):
        raise RuntimeError("TRL tokenized the pairs differently from the other sides")


# ------------------------------------------------------------------------------------------------ benchmark
def sides(size: str, precision: str, texts, trl: bool, max_steps: int, tmp: str) -> tuple[dict, list]:
    """The step of every side on one model size and precision: ({impl: unit factory}, objects to close)."""
    from rftlab.models import frozen_copy

    initial = common.build_model(size)
    prompts, chosen, rejected = encode(texts)
    data = preference_data(prompts, chosen, rejected)
    impls: dict[str, Callable] = {}
    closers = []
    rft = Rftlab(common.clone(initial), frozen_copy(initial), data, precision)
    impls["rftlab"] = rft
    if trl:
        for name, precompute in (("trl", False), ("trl-precompute", True)):
            trainer = trl_trainer(common.clone(initial), frozen_copy(initial), texts, precision, precompute,
                                  max_steps, f"{tmp}/{name}-{size}-{precision}")
            check_trl_tokens(trainer, prompts, chosen, rejected)
            stepper = common.TrainerSteps(trainer)
            impls[name] = stepper
            closers.append(stepper)
    minimal = Minimal(common.clone(initial), frozen_copy(initial), prompts, chosen, rejected, precision)
    impls["minimal"] = minimal.step
    return impls, closers


def run(sizes: list[str], precisions: list[str], rounds: int, steps: int, warmup: int, trl: bool,
        log: Callable[[str], None]) -> list[dict]:
    """Rows of every (size, precision, side): pairs/s over the median step."""
    texts = common.preference_texts(BATCH)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for precision in precisions:
                label = f"{size}-{precision}"
                log(f"{NAME} {label}")
                impls, closers = sides(size, precision, texts, trl, (warmup + rounds) * steps + 2, tmp)
                try:
                    units = {}
                    for name, fn in impls.items():
                        if isinstance(fn, Rftlab):
                            units[name] = fn.unit(steps, EPOCHS)
                        elif isinstance(fn, common.TrainerSteps):
                            units[name] = fn.unit(steps)
                        else:
                            units[name] = common.timed(fn, steps)
                    times = common.interleave(units, rounds, warmup, log)
                finally:
                    for closer in closers:
                        closer.close()
                # the same rftlab steps with the reference pass paid in full at every step (one epoch)
                times = {"rftlab": times["rftlab"], "rftlab-1epoch": impls["rftlab"].times(1.0, warmup * steps),
                         **{k: v for k, v in times.items() if k != "rftlab"}}
                rows += [common.row(NAME, label, impl, BATCH, "pairs/s", t) for impl, t in times.items()]
    return rows


def step0_losses(size: str = "1x32") -> dict[str, float]:
    """DPO loss of the rftlab step and of the minimal loop on the same pairs, against a reference that differs
    from the policy (one SGD step apart), before either updates: the two must agree."""
    from rftlab.models import frozen_copy

    texts = common.preference_texts(8)
    prompts, chosen, rejected = encode(texts)
    policy = common.build_model(size)
    reference = frozen_copy(common.build_model(size, seed=1))
    rft = Rftlab(common.clone(policy), reference, preference_data(prompts, chosen, rejected), "fp32")
    minimal = Minimal(common.clone(policy), reference, prompts, chosen, rejected, "fp32")
    with torch.no_grad():
        minimal_loss = minimal.loss().item()
    return {"rftlab": rft.step()["loss"], "minimal": minimal_loss}
