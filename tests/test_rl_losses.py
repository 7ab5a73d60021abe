"""RL and SFT losses: closed forms, hand-computed values and plain-loop oracles for rftlab.rl.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rftlab.rl import losses

F64 = torch.float64


def ragged_mask(starts: list[int], ends: list[int], length: int) -> torch.Tensor:
    """(B, T) bool mask with row b set on [starts[b], ends[b])."""
    positions = torch.arange(length)
    return (positions >= torch.tensor(starts)[:, None]) & (positions < torch.tensor(ends)[:, None])


# --------------------------------------------------------------------------------------------- masks
def test_masked_mean_ignores_padding_even_when_it_is_nan() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("-inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert losses.masked_mean(x, mask).item() == pytest.approx(13 / 4)
    torch.testing.assert_close(losses.masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(losses.masked_mean(x, mask.float(), dim=0), torch.tensor([2.5, 2.0, 6.0]))


def test_masked_whiten_has_zero_mean_unit_unbiased_std_and_zero_padding() -> None:
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3 + 2
    mask = ragged_mask([0, 1, 0], [6, 4, 2], 6)
    white = losses.masked_whiten(x, mask)
    kept = white[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-6)
    assert (white[~mask] == 0).all()
    # the oracle: normalise the flat list of kept values as SB3 does
    flat = x[mask]
    torch.testing.assert_close(kept, (flat - flat.mean()) / (flat.std() + 1e-8))
    shifted = losses.masked_whiten(x, mask, shift_mean=False)[mask]
    torch.testing.assert_close(shifted, kept + flat.mean())


# ----------------------------------------------------------------------------------------------- SFT
def test_sft_loss_equals_cross_entropy_on_the_response_tokens() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=gen)
    targets = torch.randint(0, 7, (3, 5), generator=gen)
    mask = ragged_mask([1, 0, 2], [5, 3, 4], 5)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    expected = F.cross_entropy(logits.reshape(-1, 7), targets.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)
    torch.testing.assert_close(losses.sft_loss(logprobs, mask), expected)


# ---------------------------------------------------------------------------------------- REINFORCE
def _sampled_policy(n_inputs: int, k: int, length: int, vocab: int, seed: int):
    """A tiny policy whose parameters are per-input, per-position logits θ (B, T, V), and K samples from it.

    Returns θ (requires grad) and a function giving the sequence log-probabilities log π(y_bk | x_b), (B, K).
    """
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_inputs, length, vocab, dtype=F64, generator=gen).requires_grad_()
    probs = torch.softmax(theta.detach(), -1).reshape(-1, vocab)
    samples = torch.multinomial(probs, k, replacement=True, generator=gen)  # (B·T, K)
    samples = samples.reshape(n_inputs, length, k).transpose(1, 2)  # (B, K, T)

    def seq_logprobs() -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)[:, None].expand(-1, k, -1, -1)  # (B, K, T, V)
        return logp.gather(-1, samples[..., None]).squeeze(-1).sum(-1)

    return theta, seq_logprobs


@pytest.mark.parametrize(("baseline", "normalize_std"), [("mean", False), ("rloo", False), ("mean", True),
                                                         ("rloo", True)])
def test_equal_rewards_give_exactly_zero_advantage_and_gradient(baseline: str, normalize_std: bool) -> None:
    theta, seq_logprobs = _sampled_policy(n_inputs=3, k=3, length=3, vocab=5, seed=2)
    rewards = torch.tensor([[0.1, 0.1, 0.1],  # in float64, 0.1 − mean(0.1, 0.1, 0.1) = 1.4e-17, not 0
                            [1.0, 0.0, 0.5],
                            [-1.0, 1.0, 1.0]], dtype=F64)
    assert (rewards[0] - rewards[0].mean()).abs().max() > 0  # so the exact zero below is not luck
    advantages = losses.reinforce_advantages(rewards, baseline, normalize_std=normalize_std)
    assert torch.equal(advantages[0], torch.zeros(3, dtype=F64))
    (grad,) = torch.autograd.grad(losses.reinforce_loss(seq_logprobs(), advantages), theta)
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))
    assert (grad[1:].abs().flatten(1).amax(1) > 1e-3).all()


def test_without_a_baseline_equal_rewards_still_push_the_sampled_tokens() -> None:
    theta, seq_logprobs = _sampled_policy(n_inputs=1, k=4, length=3, vocab=5, seed=2)
    rewards = torch.full((1, 4), 0.1, dtype=F64)
    advantages = losses.reinforce_advantages(rewards, "none")
    torch.testing.assert_close(advantages, rewards)
    (grad,) = torch.autograd.grad(losses.reinforce_loss(seq_logprobs(), advantages), theta)
    assert grad.abs().max().item() > 1e-3


def test_reinforce_loss_is_minus_mean_advantage_times_logprob_with_detached_advantages() -> None:
    seq_logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.0]], requires_grad=True)
    loss = losses.reinforce_loss(seq_logprobs, advantages)
    assert loss.item() == pytest.approx(-(-1.0 + 2.0 - 1.0 + 0.0) / 4)
    grad_logp, grad_adv = torch.autograd.grad(loss, [seq_logprobs, advantages], allow_unused=True)
    torch.testing.assert_close(grad_logp, -advantages.detach() / 4)
    assert grad_adv is None


def test_rloo_is_leave_one_out_and_k_over_k_minus_1_times_mean_baseline() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=F64)
    mean_adv = losses.reinforce_advantages(rewards, "mean")
    rloo_adv = losses.reinforce_advantages(rewards, "rloo")
    torch.testing.assert_close(mean_adv, torch.tensor([[-2.0, -1.0, 0.0, 3.0]], dtype=F64))
    # leave-one-out by hand: 1 − (2+3+6)/3, 2 − (1+3+6)/3, 3 − (1+2+6)/3, 6 − (1+2+3)/3
    torch.testing.assert_close(rloo_adv, torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]], dtype=F64))
    random = torch.rand(6, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(losses.reinforce_advantages(random, "rloo"),
                               5 / 4 * losses.reinforce_advantages(random, "mean"))


def test_normalize_std_divides_by_the_unbiased_group_std() -> None:
    rewards = torch.tensor([[0.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]], dtype=F64)
    advantages = losses.reinforce_advantages(rewards, "mean", normalize_std=True, eps=1e-6)
    std = math.sqrt(2 / 3)  # unbiased std of (0, 1, 1, 2): Σ(r − 1)² / 3
    torch.testing.assert_close(advantages[0], torch.tensor([-1.0, 0.0, 0.0, 1.0], dtype=F64) / (std + 1e-6))
    assert torch.equal(advantages[1], torch.zeros(4, dtype=F64))  # 0 / eps, not nan


def test_reinforce_advantages_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="baseline"):
        losses.reinforce_advantages(torch.zeros(2, 3), "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K >= 2"):
        losses.reinforce_advantages(torch.zeros(2, 1), "rloo")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        losses.reinforce_advantages(torch.zeros(3), "mean")


def test_group_reward_stats_use_trl_names_and_count_zero_std_groups_exactly() -> None:
    rewards = torch.tensor([[0.1, 0.1, 0.1],
                            [0.0, 1.0, 2.0],
                            [1.0, 1.0, 1.0],
                            [0.0, 0.0, 1.0],
                            [-1.0, -1.0, -1.0]], dtype=F64)
    stats = losses.group_reward_stats(rewards)
    assert set(stats) == {"reward/mean", "reward/std", "frac_reward_zero_std"}
    assert stats["frac_reward_zero_std"] == pytest.approx(3 / 5)
    assert stats["reward/mean"] == pytest.approx(rewards.sum().item() / 15)
    # unbiased within-group stds: 0, 1, 0, sqrt(1/3), 0
    assert stats["reward/std"] == pytest.approx((1 + math.sqrt(1 / 3)) / 5)
    population = losses.group_reward_stats(rewards, unbiased=False)
    assert population["reward/std"] == pytest.approx((math.sqrt(2 / 3) + math.sqrt(2 / 9)) / 5)


# ---------------------------------------------------------------------------------------------- PPO
def test_kl_penalized_rewards_put_the_score_on_the_last_response_token() -> None:
    gen = torch.Generator().manual_seed(4)
    logprobs, ref_logprobs = -torch.rand(3, 5, generator=gen, dtype=F64), -torch.rand(3, 5, generator=gen, dtype=F64)
    mask = ragged_mask([0, 1, 0], [3, 5, 0], 5)  # right padding, left offset, empty row
    score = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    rewards = losses.kl_penalized_rewards(score, logprobs, ref_logprobs, mask, beta=0.1)
    expected = torch.zeros(3, 5, dtype=F64)
    for b, (start, end) in enumerate([(0, 3), (1, 5)]):
        for t in range(start, end):
            expected[b, t] = -0.1 * (logprobs[b, t] - ref_logprobs[b, t])
        expected[b, end - 1] += score[b]
    torch.testing.assert_close(rewards, expected)
    # a per-row β tensor broadcasts over time
    per_row = losses.kl_penalized_rewards(score, logprobs, ref_logprobs, mask, beta=torch.tensor([0.1, 0.1, 0.5]))
    torch.testing.assert_close(per_row, expected)


def _gae_oracle(rewards, values, mask, gamma, lam):
    """Plain double loop: per row, GAE over its response positions with V = 0 after the last one."""
    advantages = torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[b, t]]
        for i, t in enumerate(steps):
            total = 0.0
            for j, u in enumerate(steps[i:]):
                next_value = values[b, steps[i + j + 1]] if i + j + 1 < len(steps) else 0.0
                delta = rewards[b, u] + gamma * next_value - values[b, u]
                total += (gamma * lam) ** j * delta
            advantages[b, t] = total
    return advantages


def test_gae_matches_a_double_loop_oracle_on_ragged_rows() -> None:
    gen = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(4, 7, generator=gen, dtype=F64), torch.randn(4, 7, generator=gen, dtype=F64)
    mask = ragged_mask([0, 2, 0, 3], [7, 6, 1, 5], 7)
    advantages, returns = losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, _gae_oracle(rewards, values, mask, 0.9, 0.8))
    torch.testing.assert_close(returns, torch.where(mask, advantages + values, 0.0))
    assert not advantages.requires_grad


def test_gae_with_lambda_1_gamma_1_is_reward_to_go_minus_value() -> None:
    gen = torch.Generator().manual_seed(6)
    rewards, values = torch.randn(3, 6, generator=gen, dtype=F64), torch.randn(3, 6, generator=gen, dtype=F64)
    mask = ragged_mask([0, 1, 0], [6, 4, 3], 6)
    advantages, returns = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    kept = torch.where(mask, rewards, 0.0)
    reward_to_go = kept.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(advantages, torch.where(mask, reward_to_go - values, 0.0))
    torch.testing.assert_close(returns, torch.where(mask, reward_to_go, 0.0))


def test_gae_with_lambda_0_is_the_one_step_td_error() -> None:
    gen = torch.Generator().manual_seed(7)
    rewards, values = torch.randn(3, 6, generator=gen, dtype=F64), torch.randn(3, 6, generator=gen, dtype=F64)
    mask = ragged_mask([0, 2, 1], [6, 5, 2], 6)
    advantages, _ = losses.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([torch.where(mask, values, 0.0)[:, 1:], torch.zeros(3, 1, dtype=F64)], 1)
    torch.testing.assert_close(advantages, torch.where(mask, rewards + 0.9 * next_values - values, 0.0))


def test_ppo_policy_loss_inside_the_clip_range_is_minus_advantage_times_ratio() -> None:
    ratio = torch.tensor([[0.85, 1.0, 1.19], [1.1, 0.9, 5.0]], dtype=F64)
    advantages = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the out-of-range last token is padding
    logprobs = ratio.log().requires_grad_()
    loss, stats = losses.ppo_policy_loss(logprobs, torch.zeros(2, 3, dtype=F64), advantages, mask, clip=0.2)
    kept = mask.bool()
    expected = -(advantages * ratio)[kept].mean()
    assert loss.item() == pytest.approx(expected.item())
    assert stats["policy/clipfrac"] == 0.0
    assert stats["policy/approxkl"] == pytest.approx(((ratio - 1) - ratio.log())[kept].mean().item())
    assert stats["val/ratio"] == pytest.approx(ratio[kept].mean().item())
    (grad,) = torch.autograd.grad(loss, logprobs)  # d(−Aρ)/d log π = −Aρ
    torch.testing.assert_close(grad, torch.where(kept, -advantages * ratio / 5, 0.0))


def test_ppo_policy_loss_clips_outside_the_range() -> None:
    # ε = 0.2. Per token: (ρ, A) → max(−Aρ, −A·clip(ρ)):
    #   (1.1,  2) → −2.2 (inside);  (1.5, 1) → max(−1.5, −1.2) = −1.2 (clipped);
    #   (0.5,  1) → max(−0.5, −0.8) = −0.5 (outside, unclipped term wins);  (0.5, −1) → max(0.5, 0.8) = 0.8 (clipped)
    ratio = torch.tensor([[1.1, 1.5, 0.5, 0.5, 3.0]], dtype=F64)
    advantages = torch.tensor([[2.0, 1.0, 1.0, -1.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logprobs = ratio.log().requires_grad_()
    loss, stats = losses.ppo_policy_loss(logprobs, torch.zeros(1, 5, dtype=F64), advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx((-2.2 - 1.2 - 0.5 + 0.8) / 4)
    assert stats["policy/clipfrac"] == pytest.approx(3 / 4)  # |ρ − 1| > ε for tokens 2, 3, 4
    assert stats["loss/policy"] == pytest.approx(loss.item())
    (grad,) = torch.autograd.grad(loss, logprobs)
    # clipped tokens carry no gradient; the others get −Aρ / n
    torch.testing.assert_close(grad, torch.tensor([[-2.2 / 4, 0.0, -0.5 / 4, 0.0, 0.0]], dtype=F64))


def test_ppo_value_loss_with_and_without_clipping() -> None:
    values = torch.tensor([[0.5, -0.05, 9.0]], dtype=F64, requires_grad=True)
    old_values = torch.zeros(1, 3, dtype=F64)
    returns = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = losses.ppo_value_loss(values, old_values, returns, mask, clip_value=None)
    assert loss.item() == pytest.approx((0.5**2 + 1.05**2) / 2)
    assert stats["val/clipfrac"] == 0.0
    assert stats["val/vpred"] == pytest.approx(0.225)
    clipped_loss, clipped_stats = losses.ppo_value_loss(values, old_values, returns, mask, clip_value=0.2)
    assert clipped_loss.item() == pytest.approx((0.8**2 + 1.05**2) / 2)  # 0.5 → 0.2; −0.05 is inside
    assert clipped_stats["val/clipfrac"] == pytest.approx(0.5)
    assert clipped_stats["val/error"] == pytest.approx(stats["loss/value"])
    (grad,) = torch.autograd.grad(clipped_loss, values)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.05, 0.0]], dtype=F64))


def test_entropy_of_uniform_logits_is_log_vocab_and_matches_categorical() -> None:
    mask = ragged_mask([0, 1], [3, 2], 4)
    uniform = torch.zeros(2, 4, 11)
    assert losses.entropy_from_logits(uniform, mask).item() == pytest.approx(math.log(11))
    logits = torch.randn(2, 4, 11, dtype=F64, generator=torch.Generator().manual_seed(8)) * 4
    logits[1, 3] = float("nan")  # padding garbage must not leak into the masked mean
    expected = torch.distributions.Categorical(logits=logits[mask]).entropy().mean()
    torch.testing.assert_close(losses.entropy_from_logits(logits, mask), expected)


def test_adaptive_kl_controller_follows_rl4lms_with_a_capped_step() -> None:
    controller = losses.AdaptiveKLController(init_beta=0.5, target=1.0)
    assert controller.update(1.1) == pytest.approx(0.5 * 1.01)  # e = 0.1: β rises by 1%
    assert controller.update(5.0) == pytest.approx(0.5 * 1.01 * 1.02)  # e = 4 capped at 0.2: +2%
    assert controller.update(0.0) == pytest.approx(0.5 * 1.01 * 1.02 * 0.98)  # e = −1 capped at −0.2: −2%
    assert controller.update(1.0) == pytest.approx(0.5 * 1.01 * 1.02 * 0.98)  # on target: unchanged
    ziegler = losses.AdaptiveKLController(init_beta=1.0, target=1.0, horizon=10)
    assert ziegler.update(1.5, n_steps=2) == pytest.approx(1.0 + 0.2 * 2 / 10)
    fixed = losses.FixedKLController(0.3)
    assert fixed.update(100.0) == 0.3 and fixed.beta == 0.3


def test_zero_std_groups_are_the_inputs_with_all_rewards_equal() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1e-7], [0.3, 0.3, 0.3], [0.0, 1.0, 0.0]])
    assert losses.zero_std_groups(rewards).tolist() == [True, False, True, False]
    share = losses.group_reward_stats(rewards)["frac_reward_zero_std"]
    assert share == losses.zero_std_groups(rewards).double().mean().item() == 0.5
