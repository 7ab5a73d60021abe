"""Finetuning steps and per-input measurements of rftlab.rl.train on a tiny GPT-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rftlab import models, tokenization
from rftlab.lm_config import LMConfig
from rftlab.rl import losses, train
from rftlab.rl.sampling import response_logprobs, sample, sequence_logprob
from rftlab.rl.settings import RFTConfig

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning", "the sun is warm"] * 20
GEN = {"max_new_tokens": 6, "min_new_tokens": 1, "top_k": 0}


@pytest.fixture(scope="module")
def lm():
    tokenizer = tokenization.train_bpe_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = models.build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), tokenizer)
    model.eval()
    return tokenizer, model


def length_score(index, texts):
    return [min(len(t.split()), 4) / 4 for t in texts]


def test_per_input_rewards_are_the_scores_of_the_returned_texts(lm) -> None:
    tokenizer, model = lm
    prompts = ["the cat", "a dog", "birds"]
    rewards, texts = train.per_input_rewards(model, tokenizer, prompts, length_score, 5, GEN, seed=3)
    assert rewards.shape == (3, 5) and len(texts) == 15
    np.testing.assert_allclose(rewards.ravel(), length_score(None, texts))
    again, _ = train.per_input_rewards(model, tokenizer, prompts, length_score, 5, GEN, seed=3)
    np.testing.assert_array_equal(rewards, again)  # same seed, same samples


def test_gradient_norm_estimate_matches_a_per_sample_oracle_and_is_zero_for_constant_rewards(lm) -> None:
    tokenizer, model = lm
    prompts = ["the cat", "a dog"]
    k, seed = 4, 11
    estimate, used = train.expected_gradient_norms(model, tokenizer, prompts, length_score, k, GEN, seed=seed)
    # oracle: Σ_k (r_k − r̄_{−k}) ∇ log π(y_k|x) / K with one autograd.grad per sample
    rollout = sample(model, tokenizer, prompts, k, seed=seed, **GEN)
    rewards = torch.tensor(length_score(None, rollout.texts(tokenizer))).view(2, k)
    np.testing.assert_allclose(used, rewards.numpy())
    adv = losses.reinforce_advantages(rewards, "rloo")
    params = [p for p in model.parameters()]
    for i in range(2):
        total = [torch.zeros_like(p) for p in params]
        for j in range(k):
            row = slice(i * k + j, i * k + j + 1)
            t = (rollout.prompt_ids[row], rollout.prompt_mask[row], rollout.response_ids[row],
                 rollout.response_mask[row])
            logp = sequence_logprob(response_logprobs(model, *t), t[3]).sum()
            grads = torch.autograd.grad(logp, params, allow_unused=True)
            total = [a + adv[i, j] * (g if g is not None else 0) / k for a, g in zip(total, grads, strict=True)]
        oracle = torch.sqrt(sum(g.pow(2).sum() for g in total)).item()
        assert estimate[i] == pytest.approx(oracle, rel=1e-4, abs=1e-7)
    constant, _ = train.expected_gradient_norms(model, tokenizer, prompts, lambda i, t: [0.5] * len(t), k, GEN)
    np.testing.assert_array_equal(constant, 0.0)


def test_reinforce_step_with_equal_rewards_leaves_the_model_unchanged(lm) -> None:
    tokenizer, base = lm
    model = models.frozen_copy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = train.reinforce_step(model, optimizer, tokenizer, ["the cat", "a dog"], lambda i, t: [1.0] * len(t),
                                 RFTConfig(algorithm="reinforce", k=3, baseline="mean"), GEN)
    assert stats["frac_reward_zero_std"] == 1.0 and stats["grad_norm"] == 0.0
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_sft_steps_lower_the_reference_loss(lm) -> None:
    tokenizer, base = lm
    model = models.frozen_copy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = train.optimizer_for(model, 1e-2)
    losses_seen = [train.sft_step(model, optimizer, tokenizer, ["the cat"], ["sat on the mat"])["loss/sft"]
                   for _ in range(15)]
    assert losses_seen[-1] < 0.5 * losses_seen[0]


def test_ppo_step_runs_and_reports_trl_style_metrics(lm) -> None:
    tokenizer, base = lm
    model = models.frozen_copy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    policy = models.PolicyWithValue(model)
    reference = models.frozen_copy(model)
    cfg = RFTConfig(k=3, minibatch_size=4, ppo_epochs=1)
    kl = losses.AdaptiveKLController(cfg.kl_init, cfg.kl_target)
    stats = train.ppo_step(policy, reference, train.optimizer_for(policy, 1e-3), tokenizer, ["the cat", "a dog"],
                           length_score, cfg, GEN, kl)
    for key in ("reward/mean", "reward/std", "kl", "beta", "entropy", "policy/clipfrac", "loss/policy",
                "loss/value"):
        assert np.isfinite(stats[key]), key
    # first minibatch pass starts at ratio 1: policy == reference at the rollout, so the KL is exactly 0
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)


def _prompt_stream(prompts, score):
    """``draw(n)`` over a fixed cycle of prompts, each batch scored by ``score(prompt, text)``."""
    position = 0

    def draw(n):
        nonlocal position
        batch = [prompts[(position + i) % len(prompts)] for i in range(n)]
        position += n
        return batch, lambda index, texts: [score(batch[i], t) for i, t in zip(index, texts, strict=True)]

    return draw


def _trainable(base):
    model = models.frozen_copy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_dynamic_sampling_without_the_filter_is_exactly_reinforce_step(lm) -> None:
    tokenizer, base = lm
    prompts = ["the cat", "a dog", "birds", "the sun"]
    cfg = RFTConfig(algorithm="reinforce", k=3, batch_prompts=4, baseline="mean", normalize_std=True)
    results = []
    for use_filter_step in (False, True):
        model = _trainable(base)
        optimizer = train.optimizer_for(model, 1e-2)
        torch.manual_seed(5)
        if use_filter_step:
            stats = train.dynamic_sampling_step(model, optimizer, tokenizer,
                                                _prompt_stream(prompts, lambda p, t: length_score(None, [t])[0]),
                                                cfg, GEN)
        else:
            stats = train.reinforce_step(model, optimizer, tokenizer, prompts, length_score, cfg, GEN)
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (plain, after_plain), (dynamic, after_dynamic) = results
    assert {k: dynamic[k] for k in plain} == plain
    assert dynamic["samples"] == 12 and dynamic["filter/rounds"] == 1 and dynamic["filter/kept_prompts"] == 4
    for a, b in zip(after_plain, after_dynamic, strict=True):
        assert torch.equal(a, b)


def test_filtered_batches_hold_no_zero_std_group_and_count_every_sample(lm) -> None:
    tokenizer, model = lm
    # "the cat" and "a dog" always score 0.5 (zero std); the other prompts score by length (varying)
    constant = {"the cat", "a dog"}
    prompts = ["the cat", "birds", "a dog", "the sun", "the cat", "a dog"]

    def score(prompt, text):
        return 0.5 if prompt in constant else length_score(None, [text])[0]

    cfg = RFTConfig(algorithm="reinforce", k=4, batch_prompts=3, baseline="mean", filter_zero_std=True,
                    max_resample_rounds=5)
    torch.manual_seed(0)
    rounds = train.dynamic_sampling_rollouts(model, tokenizer, _prompt_stream(prompts, score), cfg, GEN)
    kept_prompts = [p for rollout, _, keep in rounds for p, k in zip(rollout.prompts, keep.tolist(), strict=True) if k]
    for _, rewards, keep in rounds:
        assert not losses.zero_std_groups(rewards[keep]).any()  # no zero-std group survives the filter
        assert torch.equal(keep, ~losses.zero_std_groups(rewards))  # and every varying one is kept
    assert not constant & set(kept_prompts) and len(kept_prompts) <= cfg.batch_prompts
    # each round draws only the missing prompts: 3, then 3 − kept, ...
    drawn = [len(r.prompts) for r, _, _ in rounds]
    kept = [int(keep.sum()) for _, _, keep in rounds]
    assert drawn[0] == 3 and all(d == 3 - sum(kept[:i]) for i, d in enumerate(drawn))
    # a sample budget caps the rounds: 5 samples allow one prompt × K=4
    capped = train.dynamic_sampling_rollouts(model, tokenizer, _prompt_stream(prompts, score), cfg, GEN,
                                             max_samples=5)
    assert sum(len(r) for r, _, _ in capped) == 4


def test_a_step_on_all_zero_std_groups_resamples_then_leaves_the_model_unchanged(lm) -> None:
    tokenizer, base = lm
    model = _trainable(base)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = RFTConfig(algorithm="reinforce", k=3, batch_prompts=2, baseline="rloo", filter_zero_std=True,
                    max_resample_rounds=2)
    stats = train.dynamic_sampling_step(model, torch.optim.SGD(model.parameters(), lr=1.0), tokenizer,
                                        _prompt_stream(["the cat", "a dog"], lambda p, t: 1.0), cfg, GEN)
    assert stats["filter/rounds"] == 3 and stats["filter/kept_prompts"] == 0
    assert stats["samples"] == 3 * 2 * 3 and stats["frac_reward_zero_std"] == 1.0 and stats["grad_norm"] == 0.0
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


class _CacheRun:
    """The slice of a run handle cached_pretrained_lm uses."""

    def __init__(self, root) -> None:
        self.cache_dir, self.device, self.messages = root, "cpu", []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def progress(self, total: int, description: str):
        from rftlab.results import _SilentProgress

        return _SilentProgress()


def test_pretrained_cache_is_reused_and_a_run_that_finishes_second_takes_the_first_runs_copy(tmp_path) -> None:
    cfg = LMConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32)
    args = dict(steps=3, batch_size=4, lr=1e-3, max_length=16, seed=0)

    def make_tokenizer():
        return tokenization.train_bpe_tokenizer(TEXTS, vocab_size=300)

    first_run = _CacheRun(tmp_path)
    _, first = train.cached_pretrained_lm(first_run, "lm", ("key",), cfg, make_tokenizer, lambda: TEXTS, **args)
    assert not any("from cache" in m for m in first_run.messages)
    _, again = train.cached_pretrained_lm(_CacheRun(tmp_path), "lm", ("key",), cfg, make_tokenizer, lambda: TEXTS,
                                          **args)
    for p, q in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    # a second run with another key pretrains while a concurrent one publishes the same key first
    (cache,) = [p for p in tmp_path.iterdir() if p.name.startswith("lm-")]

    def texts_while_a_rival_publishes():
        import shutil

        from rftlab.config import config_hash

        shutil.copytree(cache, tmp_path / f"lm-{config_hash(('other',))}")
        return TEXTS[::-1]

    late = _CacheRun(tmp_path)
    _, model = train.cached_pretrained_lm(late, "lm", ("other",), cfg, make_tokenizer, texts_while_a_rival_publishes,
                                          **args)
    assert any("from cache" in m for m in late.messages)
    for p, q in zip(first.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the rival's (copied) weights, not its own
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # its temporary folder is gone


@pytest.mark.parametrize("older_torch", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5, 100.0])
def test_apply_update_returns_the_pre_clip_norm_and_steps_with_the_clipped_gradient(monkeypatch, older_torch,
                                                                                    max_grad_norm) -> None:
    """Oracle: with SGD at lr 1 the update is −g·min(1, c/‖g‖); torch < 2.6 (no get_total_norm) takes the same."""
    if older_torch:
        monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    x = torch.randn(8, 3)
    loss = (model(x) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    scale = min(1.0, max_grad_norm / expected_norm) if max_grad_norm > 0 else 1.0
    before = [p.detach().clone() for p in model.parameters()]
    norm = train.apply_update(model, torch.optim.SGD(model.parameters(), lr=1.0), (model(x) ** 2).mean(),
                              max_grad_norm)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    assert (scale < 1.0) == (max_grad_norm == 0.5)  # the grid holds a clipped step and two unclipped ones
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - scale * g, rtol=1e-5, atol=1e-6)


def test_optimizer_for_falls_back_to_plain_adamw_where_torch_has_no_fused_cpu_kernel(monkeypatch) -> None:
    real_adamw = torch.optim.AdamW

    def adamw_without_fused_cpu(params, fused=None, **kwargs):  # torch < 2.4 refuses fused=True for CPU tensors
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real_adamw(params, fused=fused, **kwargs)

    model = torch.nn.Linear(3, 2)
    assert train.optimizer_for(model, 1e-3).defaults["fused"]
    monkeypatch.setattr(torch.optim, "AdamW", adamw_without_fused_cpu)
    optimizer = train.optimizer_for(model, 1e-3, weight_decay=0.1)
    assert not optimizer.defaults["fused"] and optimizer.defaults["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2
