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
