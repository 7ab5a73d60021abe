"""One optimizer step of each finetuning method, and the per-input measurements around them.

Experiments write their own loops over these steps (no trainer class): ``lm_pretrain`` (the stand-in for
GPT-2/T5 pretraining), ``sft_step``, ``reinforce_step`` (and ``dynamic_sampling_step``: REINFORCE with DAPO's
filter of zero-variance groups), ``ppo_step``, then ``per_input_rewards`` and ``expected_gradient_norms`` to
measure where each input stands.

``score`` arguments are callables ``score(prompt_index: list[int], completions: list[str]) -> list[float]``
that reward completion i for prompt ``prompt_index[i]`` of the current batch.

Models stay in eval mode throughout: dropout off, so PPO's first ratio π_θ/π_old is exactly 1 and log-probs
of sampling and of training agree (gradients flow regardless of the mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rftlab.models import is_seq2seq
from rftlab.rl import losses
from rftlab.rl.sampling import Rollout, encode_pairs, response_forward, response_logprobs, sample, sequence_logprob
from rftlab.rl.settings import RFTConfig

Score = Callable[[list[int], list[str]], list[float]]


def optimizer_for(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel where torch has one for them (CPU and CUDA
    floating-point tensors, as TRL's default ``adamw_torch_fused``): one kernel instead of a loop over tensors,
    the same update up to float rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    except RuntimeError:  # torch < 2.4 has no fused AdamW kernel for CPU tensors
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 max_grad_norm: float) -> float:
    """Backward, clipping to ``max_grad_norm`` (none when ≤ 0), update; returns the pre-clip global gradient norm.

    Every training step of the package (RFT, SFT, PPO, preference losses) ends here."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch ≥ 2.6
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_grad_norm > 0:  # no clipping: skip clip_grad_norm_'s multiply of every gradient by 1
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    else:  # older torch: clip_grad_norm_ also returns the pre-clip norm; an infinite bound leaves gradients as they are
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    return norm.item()


def lm_pretrain(model: nn.Module, tokenizer, texts: Sequence[str], *, steps: int, batch_size: int, lr: float,
                max_length: int, seed: int, progress=None) -> list[float]:
    """Causal language modelling on ``texts`` (EOS appended): next-token cross-entropy on every token.

    Minibatches are drawn uniformly with replacement from ``texts`` by a generator seeded with ``seed``.
    Returns the loss of every step.
    """
    model.eval()
    optimizer = optimizer_for(model, lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    encoded = tokenizer([t + tokenizer.eos_token for t in texts], add_special_tokens=False, truncation=True,
                        max_length=max_length)["input_ids"]
    history = []
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=gen).tolist()
        rows = [encoded[i] for i in idx]
        width = max(map(len, rows))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for r, row in enumerate(rows):  # ragged Python lists → one padded tensor (not a per-token loop)
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        dev = next(model.parameters()).device
        loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        apply_update(model, optimizer, loss, 1.0)
        history.append(loss.item())
        if progress is not None:
            progress.advance()
    return history


def cached_pretrained_lm(run, name: str, key: object, model_cfg, make_tokenizer: Callable[[], object],
                         texts: Callable[[], Sequence[str]], *, steps: int, batch_size: int, lr: float,
                         max_length: int, seed: int):
    """(tokenizer, model): a small LM built from ``model_cfg`` and pretrained by :func:`lm_pretrain` on
    ``texts()``, cached under ``<results>/_cache/<name>-<hash of key>`` (tokenizer files + ``model.pt``).

    ``key`` must contain everything the result depends on (data, model, pretraining settings, seed). The
    folder is written under a temporary name and renamed, so a killed run never leaves a half-written cache.
    """
    from rftlab import models
    from rftlab.config import config_hash

    folder = run.cache_dir / f"{name}-{config_hash(key)}"

    def load_cached():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = models.build_model(model_cfg, tokenizer)
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        run.info(f"pretrained model from cache {folder}")
        return tokenizer, model.to(run.device)

    if (folder / "model.pt").exists():
        return load_cached()
    tokenizer = make_tokenizer()
    model = models.build_model(model_cfg, tokenizer).to(run.device)
    with run.progress(steps, "pretrain LM") as bar:
        history = lm_pretrain(model, tokenizer, texts(), steps=steps, batch_size=batch_size, lr=lr,
                              max_length=max_length, seed=seed, progress=bar)
    if history:
        run.info(f"pretraining loss {history[0]:.2f} → {np.mean(history[-20:]):.2f}")
    import shutil
    import tempfile

    # a temporary folder of this process's own: runs started together pretrain side by side without clashing
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    tokenizer.save_pretrained(tmp)
    torch.save(model.state_dict(), tmp / "model.pt")
    try:
        tmp.rename(folder)
    except OSError:  # another run finished first: use its copy, so every run sharing the key sees the same model
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model.pt").exists():
            raise
        return load_cached()
    return tokenizer, model


def sft_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, prompts: Sequence[str],
             references: Sequence[str], *, max_response_length: int | None = None) -> dict[str, float]:
    """One step of cross-entropy on (prompt, reference) pairs: −mean over response tokens of log π(y_t|x, y_<t)."""
    device = next(model.parameters()).device
    batch = [t.to(device) for t in encode_pairs(tokenizer, prompts, references, seq2seq=is_seq2seq(model),
                                                max_response_length=max_response_length)]
    logprobs = response_logprobs(model, *batch)
    loss = losses.sft_loss(logprobs, batch[3])
    grad_norm = apply_update(model, optimizer, loss, 1.0)
    return {"loss/sft": loss.item(), "grad_norm": grad_norm}


def reinforce_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, prompts: Sequence[str],
                   score: Score, cfg: RFTConfig, generation: dict) -> dict[str, float]:
    """REINFORCE on K samples per prompt: loss = −mean_{x,k} A(x,k)·log π(y_k|x), A from the chosen baseline.

    With the ``mean`` or ``rloo`` baseline an input whose K rewards are equal contributes exactly nothing.
    """
    # the rollout's own scoring forward is skipped: the loss needs the log-probs with gradients, one forward
    rollout = sample(model, tokenizer, prompts, cfg.k, temperature=cfg.temperature, score_logprobs=False,
                     **generation)
    rewards = torch.tensor(score(rollout.prompt_index.tolist(), rollout.texts(tokenizer)), dtype=torch.float32)
    rewards = rollout.by_prompt(rewards)  # (B, K)
    advantages = losses.reinforce_advantages(rewards, cfg.baseline, cfg.normalize_std)
    logprobs = response_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                 rollout.response_mask, cfg.temperature)
    seq_logprobs = rollout.by_prompt(sequence_logprob(logprobs, rollout.response_mask))
    loss = losses.reinforce_loss(seq_logprobs, advantages.to(seq_logprobs.device))
    grad_norm = apply_update(model, optimizer, loss, cfg.max_grad_norm)
    return {**losses.group_reward_stats(rewards), "loss/policy": loss.item(), "grad_norm": grad_norm,
            "completions/mean_length": rollout.lengths.float().mean().item()}


Draw = Callable[[int], tuple[Sequence[str], Score]]


def dynamic_sampling_rollouts(model: nn.Module, tokenizer, draw: Draw, cfg: RFTConfig, generation: dict,
                              max_samples: int | None = None,
                              score_logprobs: bool = True) -> list[tuple[Rollout, torch.Tensor, torch.Tensor]]:
    """The rollouts of one REINFORCE step, with DAPO's dynamic sampling when ``cfg.filter_zero_std``.

    ``draw(n)`` returns n fresh prompts and their ``score``. Round 0 samples K completions for
    ``cfg.batch_prompts`` prompts. With the filter on, inputs whose K rewards are all equal (zero advantage
    under a mean/rloo baseline, so zero gradient) are dropped, and up to ``cfg.max_resample_rounds`` further
    rounds draw as many fresh prompts as are missing; the batch may stay short when the rounds run out
    (DAPO instead fails; verl's ``max_num_gen_batches``). ``max_samples`` caps the completions sampled over
    all rounds (a sample budget), so a round may draw fewer prompts, or none.

    Returns one ``(rollout, rewards (B, K), keep (B,) bool)`` per round; ``keep`` is all True without the filter.
    ``score_logprobs=False`` leaves the rollouts' ``logprobs`` unscored (nan), as in ``sample``.
    """
    limit = float("inf") if max_samples is None else max_samples
    rounds: list[tuple[Rollout, torch.Tensor, torch.Tensor]] = []
    kept = sampled = 0
    for _ in range(1 + (cfg.max_resample_rounds if cfg.filter_zero_std else 0)):
        n = int(min(cfg.batch_prompts - kept, (limit - sampled) // cfg.k))
        if n <= 0:
            break
        prompts, score = draw(n)
        rollout = sample(model, tokenizer, prompts, cfg.k, temperature=cfg.temperature,
                         score_logprobs=score_logprobs, **generation)
        rewards = rollout.by_prompt(torch.tensor(score(rollout.prompt_index.tolist(), rollout.texts(tokenizer)),
                                                 dtype=torch.float32))
        keep = (~losses.zero_std_groups(rewards) if cfg.filter_zero_std
                else torch.ones(len(prompts), dtype=torch.bool))
        rounds.append((rollout, rewards, keep))
        kept, sampled = kept + int(keep.sum()), sampled + len(rollout)
    return rounds


def dynamic_sampling_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokenizer, draw: Draw,
                          cfg: RFTConfig, generation: dict, max_samples: int | None = None) -> dict[str, float]:
    """:func:`reinforce_step` on the rollouts of :func:`dynamic_sampling_rollouts`.

    loss = −(1/(B_kept·K)) Σ_{kept x, k} A(x, k)·log π(y_k|x), advantages per input as in
    :func:`reinforce_step`. Without the filter (one round, every input kept) it is exactly ``reinforce_step``
    on ``draw(cfg.batch_prompts)``. When no input is kept the model is left as it is (no optimizer step).

    Statistics: ``group_reward_stats`` over every sampled input (all rounds: each round is a fresh random draw
    of prompts, so ``frac_reward_zero_std`` estimates the same share as without the filter), ``samples``
    (completions sampled), ``filter/rounds`` and ``filter/kept_prompts`` (inputs in the update).
    """
    rounds = dynamic_sampling_rollouts(model, tokenizer, draw, cfg, generation, max_samples, score_logprobs=False)
    if not rounds:
        raise ValueError("max_samples is smaller than K: no input can be sampled")
    n_kept = sum(int(keep.sum()) for _, _, keep in rounds)
    loss = None
    for rollout, rewards, keep in rounds:
        if not keep.any():
            continue
        rows = keep.repeat_interleave(cfg.k).to(rollout.response_ids.device)  # prompt-major rows of kept inputs
        advantages = losses.reinforce_advantages(rewards[keep], cfg.baseline, cfg.normalize_std)
        mask = rollout.response_mask[rows]
        logprobs = response_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                     rollout.response_ids[rows], mask, cfg.temperature)
        seq_logprobs = sequence_logprob(logprobs, mask).view(-1, cfg.k)
        part = losses.reinforce_loss(seq_logprobs, advantages.to(seq_logprobs.device)) * (int(keep.sum()) / n_kept)
        loss = part if loss is None else loss + part
    grad_norm = apply_update(model, optimizer, loss, cfg.max_grad_norm) if loss is not None else 0.0
    rewards = torch.cat([r for _, r, _ in rounds])
    return {**losses.group_reward_stats(rewards), "loss/policy": loss.item() if loss is not None else 0.0,
            "grad_norm": grad_norm,
            "completions/mean_length": torch.cat([r.lengths for r, _, _ in rounds]).float().mean().item(),
            "samples": sum(len(r) for r, _, _ in rounds), "filter/rounds": len(rounds), "filter/kept_prompts": n_kept}


def ppo_step(policy: nn.Module, reference: nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
             prompts: Sequence[str], score: Score, cfg: RFTConfig, generation: dict,
             kl_controller) -> dict[str, float]:
    """One PPO iteration as RL4LMs runs it: rollout, per-token reward −β·(log π − log π_ref) with the task
    score on the last token, GAE(γ, λ) advantages (whitened), then ``ppo_epochs`` passes of clipped policy
    loss + vf_coef·value loss − ent_coef·entropy over minibatches, and the adaptive-β update.

    ``policy`` is a :class:`rftlab.models.PolicyWithValue`; ``reference`` a frozen copy of the initial model.
    """
    # scored below (old log-probs and values in one forward), so the rollout's own scoring is skipped
    rollout = sample(policy, tokenizer, prompts, cfg.k, temperature=cfg.temperature, score_logprobs=False,
                     **generation)
    mask = rollout.response_mask.float()
    scores = torch.tensor(score(rollout.prompt_index.tolist(), rollout.texts(tokenizer)), dtype=torch.float32)
    tensors = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
    with torch.no_grad():
        old = response_forward(policy, *tensors, temperature=cfg.temperature)
    with torch.inference_mode():
        ref_logprobs = response_logprobs(reference, *tensors, temperature=cfg.temperature)
    ref_logprobs = ref_logprobs.clone()  # an ordinary tensor again, for the losses' autograd graphs
    beta = kl_controller.beta
    token_rewards = losses.kl_penalized_rewards(scores.to(mask.device), old.logprobs, ref_logprobs, mask, beta)
    advantages, returns = losses.gae(token_rewards, old.values, mask, cfg.gamma, cfg.lam)
    advantages = losses.masked_whiten(advantages, mask)

    stats: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, ()).item()))
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(len(rollout), generator=gen).split(cfg.minibatch_size):
            out = response_forward(policy, *(t[idx] for t in tensors), temperature=cfg.temperature)
            policy_loss, p_stats = losses.ppo_policy_loss(out.logprobs, old.logprobs[idx], advantages[idx],
                                                          mask[idx], cfg.clip)
            value_loss, v_stats = losses.ppo_value_loss(out.values, old.values[idx], returns[idx], mask[idx])
            entropy = losses.entropy_from_logits(out.logits, mask[idx])
            loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
            grad_norm = apply_update(policy, optimizer, loss, cfg.max_grad_norm)
            for key, value in {**p_stats, **v_stats, "entropy": entropy.item(), "grad_norm": grad_norm}.items():
                stats.setdefault(key, []).append(value)
    kl = losses.masked_mean(old.logprobs - ref_logprobs, mask).item()
    kl_controller.update(kl)
    return {**losses.group_reward_stats(rollout.by_prompt(scores)), "kl": kl, "beta": beta,
            **{k: float(np.mean(v)) for k, v in stats.items()},
            "completions/mean_length": rollout.lengths.float().mean().item()}


@torch.no_grad()
def per_input_rewards(model: nn.Module, tokenizer, prompts: Sequence[str], score: Score, k: int,
                      generation: dict, *, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 64, progress: Callable[[int], object] | None = None
                      ) -> tuple[np.ndarray, list[str]]:
    """K sampled completions per prompt, scored: rewards (N, K) and the N·K texts (prompt-major).

    Prompts are sampled in chunks of ``batch_size``, chunk c with its own seed ``chunk_seed(seed, c)`` (chunk 0:
    ``seed``), so a chunk's draws do not depend on which process samples it: in a run of several processes
    (:mod:`rftlab.distributed`) each process samples and scores its share of the chunks and every process gets
    all rewards and texts back, equal to a one-process run's. ``score`` is called once per chunk, with the
    chunk's prompt indices into ``prompts``. ``progress(n)`` is called as each chunk of n prompts is sampled."""
    from rftlab import distributed as dist

    mine = []
    for c in dist.shard(range(-(-len(prompts) // batch_size))):
        start = c * batch_size
        rollout = sample(model, tokenizer, prompts[start:start + batch_size], k, temperature=temperature,
                         seed=dist.chunk_seed(seed, c), batch_size=batch_size, progress=progress,
                         score_logprobs=False, **generation)  # only the texts are read
        texts = rollout.texts(tokenizer)
        index = (start + rollout.prompt_index).tolist()  # prompt-major, k rows per prompt
        mine.append((np.asarray(score(index, texts), dtype=np.float64), texts))
    chunks = dist.gather(mine)
    rewards = np.concatenate([r for r, _ in chunks]) if chunks else np.zeros(0)
    return rewards.reshape(len(prompts), k), [t for _, texts in chunks for t in texts]


def expected_gradient_norms(model: nn.Module, tokenizer, prompts: Sequence[str], score: Score, k: int,
                            generation: dict, *, temperature: float = 1.0, seed: int = 0,
                            batch_size: int | None = None, progress: Callable[[int], object] | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    """A sampled estimate of ‖∇θ V(x)‖ per prompt, V(x) = E_{y~π(·|x)}[r(x, y)].

    ĝ(x) = (1/K) Σ_k (r_k − r̄_{−k}) ∇θ log π(y_k|x) with the leave-one-out mean r̄_{−k}, an unbiased
    estimate of ∇V(x); its norm is biased upwards by sampling noise, and exactly 0 when all K rewards are
    equal (so small reward std shows up as a small estimate, as Theorem 1 bounds the true norm).
    One backward per prompt. Returns the (N,) norms and the (N, K) rewards of the samples they used.

    Prompts go in chunks of ``batch_size`` (None: one chunk), seeded and split between processes as in
    :func:`per_input_rewards`; ``progress(n)`` is called after each chunk of n prompts.
    """
    from rftlab import distributed as dist

    size = batch_size or max(len(prompts), 1)
    mine = []
    for c in dist.shard(range(-(-len(prompts) // size))):
        start = c * size
        norms, used = _gradient_norms_chunk(
            model, tokenizer, prompts[start:start + size], lambda idx, t, start=start: score(
                [start + i for i in idx], t), k, generation, temperature, dist.chunk_seed(seed, c))
        mine.append((norms, used))
        if progress is not None:
            progress(len(norms))
    chunks = dist.gather(mine)
    if not chunks:
        return np.zeros(0), np.zeros((0, k))
    return np.concatenate([n for n, _ in chunks]), np.concatenate([u for _, u in chunks])


def _gradient_norms_chunk(model: nn.Module, tokenizer, prompts: Sequence[str], score: Score, k: int,
                          generation: dict, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`expected_gradient_norms` of one chunk of prompts, sampled with ``seed``."""
    rollout = sample(model, tokenizer, prompts, k, temperature=temperature, seed=seed, score_logprobs=False,
                     **generation)
    rewards = torch.tensor(score(rollout.prompt_index.tolist(), rollout.texts(tokenizer)), dtype=torch.float32)
    advantages = losses.reinforce_advantages(rollout.by_prompt(rewards), "rloo")
    params = [p for p in model.parameters() if p.requires_grad]
    norms = np.zeros(len(prompts))
    for i in range(len(prompts)):  # per-input gradients: one backward each
        if advantages[i].abs().max() == 0:
            continue
        rows = slice(i * k, (i + 1) * k)
        tensors = (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.response_ids[rows],
                   rollout.response_mask[rows])
        seq = sequence_logprob(response_logprobs(model, *tensors, temperature=temperature), tensors[3])
        grads = torch.autograd.grad((advantages[i].to(seq.device) * seq).mean(), params, allow_unused=True)
        norms[i] = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item()
    return norms, rollout.by_prompt(rewards).numpy()
