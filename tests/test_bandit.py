"""Bandit building blocks of the controlled experiments: label sets, flips, rewards and exact objectives."""

from __future__ import annotations

import torch

from rftlab import bandit


def test_label_sets_hold_the_class_and_distinct_others() -> None:
    sets = bandit.label_sets(10, 5, torch.Generator().manual_seed(0))
    assert sets.shape == (10, 5)
    assert torch.equal(sets[:, 0], torch.arange(10))
    assert all(len(set(row.tolist())) == 5 for row in sets)


def test_flipped_labels_leave_the_class_set_and_the_rest_stay() -> None:
    gen = torch.Generator().manual_seed(1)
    sets = bandit.label_sets(10, 5, gen)
    labels = torch.arange(1000) % 10
    new, flipped = bandit.flip_labels(labels, sets, 0.1, gen)
    assert flipped.sum().item() == 100
    assert torch.equal(new[~flipped], labels[~flipped])
    for y, y_new in zip(labels[flipped].tolist(), new[flipped].tolist(), strict=True):
        assert y_new not in sets[y].tolist()


def test_reward_matrix_values() -> None:
    labels, flipped = torch.tensor([0, 1]), torch.tensor([False, True])
    r = bandit.reward_matrix(labels, flipped, 3, wrong_reward_flipped=0.5)
    assert torch.equal(r, torch.tensor([[1.0, -1.0, -1.0], [0.5, 1.0, 0.5]]))


def test_expected_reward_gradient_is_p_times_advantage() -> None:
    """∂V/∂z_j = p_j (r_j − V): the exact expected (policy) gradient on the logits."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    rewards = torch.rand(4, 6, dtype=torch.float64) * 2 - 1
    value = bandit.expected_reward(logits, rewards)
    (grad,) = torch.autograd.grad(value.sum(), logits)
    p = torch.softmax(logits, -1).detach()
    torch.testing.assert_close(grad, p * (rewards - value.detach()[:, None]))
    # and its norm is at most the reward std (Theorem 1 with L = 1 and an identity Jacobian)
    assert (grad.norm(dim=1) <= bandit.reward_std(logits.detach(), rewards) + 1e-12).all()


def test_equal_rewards_give_zero_rft_gradient_and_zero_std() -> None:
    logits = torch.randn(3, 5, requires_grad=True)
    rewards = torch.full((3, 5), 0.7)
    loss = bandit.finetune_loss("rft", logits, torch.zeros(3, dtype=torch.long), rewards)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max().item() < 1e-7
    assert bandit.reward_std(logits.detach(), rewards).max().item() < 1e-3


def test_soft_cross_entropy_is_mean_nll_over_the_set() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    logp = torch.log_softmax(logits, -1)[0]
    expected = -(logp[0] + logp[2]) / 2
    torch.testing.assert_close(bandit.soft_cross_entropy(logits, torch.tensor([[0, 2]])), expected)


def test_transformer_classifier_ignores_padding() -> None:
    torch.manual_seed(0)
    model = bandit.TransformerClassifier(vocab_size=12, n_classes=6, max_len=8, width=16, layers=1, heads=2)
    model.eval()
    short = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0]])
    longer_pad = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0, 0, 0][:8]])
    torch.testing.assert_close(model(short), model(longer_pad))
    assert model(torch.randint(1, 12, (5, 8))).shape == (5, 6)
