"""group-rft-step: one RFT step with K = 8 samples per prompt and a group baseline — rftlab vs TRL's
GRPOTrainer vs a minimal loop.

Work per step, the same on every side: 16 prompts of ≈16 tokens (CPython help text, the same 16 at every
step), K = 8 completions each of at most 32 new tokens drawn at temperature 1 with no top-k / top-p
truncation, a reward per completion (the share of its letters that are "e": cheap, deterministic, spread within
a group, so no group has zero advantage), advantages against the group's mean reward, the policy-gradient loss,
backward, AdamW (fused on every side, TRL's default), lr 1e-6. Throughput: completions per second = 128 /
median step time.

- ``rftlab``: ``rftlab.rl.train.reinforce_step`` with ``RFTConfig(k=8, baseline="mean", normalize_std=False,
  max_grad_norm=1.0)``: ``sample`` (on a GPT-2 the fused sampler: each prompt prefilled once, K copies of its KV
  cache, a cache preallocated for all 32 steps; no scoring forward, since the loss computes the log-probs with
  gradients), decode and score, one training forward in which each prompt is run once for its 8 completions
  (``rftlab.rl.fast_gpt2``), loss −mean_k A_k · log π(y_k|x), backward, gradient norm and clipping, AdamW.
- ``trl-beta0`` / ``trl-beta0.04``: ``GRPOTrainer`` (no vLLM: ``model.generate`` on the 128 prompt rows) timed per
  optimizer step (``TrainerSteps``: ``train()`` in chunks, the first step of each untimed): generation, reward,
  advantages (TRL's default group std scaling), a policy forward with grad (one iteration per generation, so no
  separate old-policy pass), with β = 0.04 also a reference forward, TRL's default ``dapo`` token-level loss,
  backward, clipping to 1.0, AdamW, callbacks. Built from a saved copy of the model (GRPOTrainer makes its
  reference by reloading the model's path). fp32 rows: ``bf16=False, gradient_checkpointing=False``; bf16 rows:
  TRL's defaults (bf16 autocast, gradient checkpointing). Logging and checkpoints off.
- ``minimal``: ``model.generate(num_return_sequences=8)`` on the left-padded prompts, mask after the first
  EOS, decode and score, one forward of the 128 [prompt ; completion] rows (position ids counting real tokens,
  as generate numbers them), per-token log-softmax and gather, the same loss as rftlab, backward, AdamW.

rftlab's loss (sequence-level REINFORCE with a mean baseline, Dr. GRPO) and TRL's (token-level, std-scaled
advantages, a clipped ratio that is 1 on the first iteration) weigh tokens differently; the work — generate,
score, one policy forward and backward per step (plus a reference forward for β > 0) — is the same. rftlab has
no KL term in this step, so ``trl-beta0`` is the like-for-like row; the β = 0.04 row shows what the KL costs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

from benchmarks import common

NAME = "group-rft-step"
PROMPTS, K, NEW_TOKENS, LR = 16, 8, 32, 1e-6


def rft_config():
    from rftlab.rl.settings import RFTConfig

    return RFTConfig(algorithm="reinforce", batch_prompts=PROMPTS, k=K, lr=LR, temperature=1.0, baseline="mean",
                     normalize_std=False, max_grad_norm=1.0)


class Rftlab:
    def __init__(self, model, prompts: list[str], precision: str, new_tokens: int = NEW_TOKENS) -> None:
        from rftlab.rl.train import optimizer_for

        self.model, self.prompts, self.precision = model, prompts, precision
        self.optimizer = optimizer_for(model, LR)
        self.cfg, self.generation = rft_config(), {"max_new_tokens": new_tokens}

    def step(self) -> dict[str, float]:
        from rftlab.rl.train import reinforce_step

        with common.precision_context(self.precision):
            return reinforce_step(self.model, self.optimizer, common.tokenizer(), self.prompts, common.count_e,
                                  self.cfg, self.generation)


class Minimal:
    """generate → rewards → mean-baseline advantages → one forward/backward → AdamW."""

    def __init__(self, model, prompts: list[str], precision: str, new_tokens: int = NEW_TOKENS) -> None:
        tok = common.tokenizer()
        self.model, self.precision, self.new_tokens = model, precision, new_tokens
        enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
        self.prompt_ids, self.prompt_mask = enc["input_ids"], enc["attention_mask"]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)

    def rollout(self) -> tuple[torch.Tensor, ...]:
        tok = common.tokenizer()
        with torch.no_grad():
            out = self.model.generate(input_ids=self.prompt_ids, attention_mask=self.prompt_mask, do_sample=True,
                                      num_return_sequences=K, max_new_tokens=self.new_tokens, top_k=0, top_p=1.0,
                                      temperature=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        completion = out[:, self.prompt_ids.shape[1]:]
        is_eos = (completion == tok.eos_token_id).long()
        mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()  # up to and including the first EOS
        completion = torch.where(mask.bool(), completion, tok.pad_token_id)
        texts = tok.batch_decode(completion.tolist(), skip_special_tokens=True)
        rewards = torch.tensor(common.count_e([], texts)).view(-1, K)
        advantages = rewards - rewards.mean(-1, keepdim=True)
        return completion, mask, advantages

    def loss(self, completion: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        prompt_ids, prompt_mask = self.prompt_ids.repeat_interleave(K, 0), self.prompt_mask.repeat_interleave(K, 0)
        ids = torch.cat([prompt_ids, completion], 1)
        attention = torch.cat([prompt_mask, mask], 1)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        p = prompt_ids.shape[1]
        logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        logp = logits[:, p - 1: -1].float().log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)
        seq = (logp * mask).sum(-1)
        return -(advantages.flatten() * seq).mean()

    def step(self) -> float:
        with common.precision_context(self.precision):
            completion, mask, advantages = self.rollout()
            loss = self.loss(completion, mask, advantages)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def trl_trainer(model_dir: str, prompts: list[str], precision: str, beta: float, max_steps: int, out_dir: str,
                new_tokens: int = NEW_TOKENS):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    common.quiet_trl()
    kwargs = dict(output_dir=out_dir, per_device_train_batch_size=len(prompts) * K, num_generations=K,
                  max_completion_length=new_tokens, max_steps=max_steps, learning_rate=LR, beta=beta,
                  report_to="none", logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0, seed=0)
    if precision == "fp32":
        kwargs |= dict(bf16=False, gradient_checkpointing=False)
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    return GRPOTrainer(model=model_dir, reward_funcs=common.trl_count_e, args=GRPOConfig(**kwargs),
                       train_dataset=dataset, processing_class=common.tokenizer())


def sides(size: str, precision: str, prompts: list[str], trl: bool, max_steps: int, tmp: str,
          new_tokens: int = NEW_TOKENS) -> tuple[dict, list]:
    initial = common.build_model(size)
    impls: dict[str, object] = {}
    closers = []
    impls["rftlab"] = Rftlab(common.clone(initial), prompts, precision, new_tokens).step
    if trl:
        model_dir = f"{tmp}/model-{size}"
        initial.save_pretrained(model_dir)
        common.tokenizer().save_pretrained(model_dir)
        for beta in (0.0, 0.04):
            trainer = trl_trainer(model_dir, prompts, precision, beta, max_steps, f"{tmp}/trl-{size}-{beta}",
                                  new_tokens)
            stepper = common.TrainerSteps(trainer)
            impls[f"trl-beta{beta:g}"] = stepper
            closers.append(stepper)
    impls["minimal"] = Minimal(common.clone(initial), prompts, precision, new_tokens).step
    return impls, closers


def run(sizes: list[str], precisions: list[str], rounds: int, steps: int, warmup: int, trl: bool,
        log: Callable[[str], None], new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Rows of every (size, precision, side): completions/s over the median step."""
    prompts = common.prompts(PROMPTS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for precision in precisions:
                label = f"{size}-{precision}"
                log(f"{NAME} {label}")
                impls, closers = sides(size, precision, prompts, trl, (warmup + rounds) * steps + 2, tmp, new_tokens)
                try:
                    units = {name: fn.unit(steps) if isinstance(fn, common.TrainerSteps) else common.timed(fn, steps)
                             for name, fn in impls.items()}
                    times = common.interleave(units, rounds, warmup, log)
                finally:
                    for closer in closers:
                        closer.close()
                rows += [common.row(NAME, label, impl, PROMPTS * K, "completions/s", t) for impl, t in times.items()]
    return rows


def step0_losses(size: str = "1x32", new_tokens: int = 8, seed: int = 0) -> dict[str, float]:
    """The rftlab step's loss and the minimal loop's on the same draws (same seed: rftlab's sampler draws what
    ``generate`` draws) and the same rewards, before either updates: the two must agree."""
    prompts = common.prompts(4)
    model = common.build_model(size)
    rft = Rftlab(common.clone(model), prompts, "fp32", new_tokens)
    minimal = Minimal(common.clone(model), prompts, "fp32", new_tokens)
    torch.manual_seed(seed)
    rft_loss = rft.step()["loss/policy"]
    torch.manual_seed(seed)
    with torch.no_grad():
        minimal_loss = minimal.loss(*minimal.rollout()).item()
    return {"rftlab": rft_loss, "minimal": minimal_loss}
