"""theorem-bound (Razin et al. 2024, Theorem 1): the bound holds on the smoke preset, the exact gradient
norms and γ match plain autograd oracles, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call

from rftlab import enumerable, results
from rftlab.experiments import theorem_bound

SMOKE = theorem_bound.Config(output_lens=(1, 2), n_inputs=6, snapshot_steps=(0, 50), temperatures=(0.5, 1.0))


@pytest.fixture(scope="module")
def inputs(smoke_run: Path) -> pd.DataFrame:
    return results.read_table(smoke_run, "inputs")


def test_smoke_table_shape(inputs: pd.DataFrame, smoke_run: Path) -> None:
    # 2 lengths × 2 snapshots × 2 temperatures × 6 inputs
    assert len(inputs) == 48
    assert sorted(inputs.output_len.unique()) == [1, 2]
    assert inputs.groupby(["output_len", "pretrain_step", "temperature"]).size().eq(6).all()
    assert set(inputs.target_kind) == {"worst", "random", "best"}
    metrics = results.read_metrics(smoke_run)
    assert metrics.output_len.tolist() == [1, 2] and metrics.n_points.tolist() == [24, 24]
    for length, row in metrics.set_index("output_len").iterrows():
        assert row.max_bound_ratio == pytest.approx(inputs[inputs.output_len == length].bound_ratio.max())


def test_every_point_satisfies_theorem_1(inputs: pd.DataFrame) -> None:
    assert (inputs.reward_std >= 0).all() and (inputs.gamma > 0).all()
    expected_bound = 6 * inputs.output_len * inputs.gamma * inputs.reward_std ** (2 / 3)
    assert (inputs.bound - expected_bound).abs().max() < 1e-4 * expected_bound.max()
    assert (inputs.grad_norm <= inputs.bound + 1e-7).all()
    assert inputs.bound_ratio.max() <= 1.0


def test_single_token_bound_for_length_1(inputs: pd.DataFrame) -> None:
    one = inputs[inputs.output_len == 1]
    assert (one.grad_norm <= one.gamma * one.reward_std + 1e-6).all()


def test_tiny_std_far_from_optimum_exists(inputs: pd.DataFrame) -> None:
    """The paper's point: confidently wrong inputs have tiny std (so tiny gradient) yet low reward."""
    stuck = inputs[(inputs.reward_std < 1e-3) & (inputs.reward_mean < inputs.reward_max - 1)]
    assert len(stuck) >= 1
    assert "worst" in set(stuck.target_kind) and "best" not in set(stuck.target_kind)
    assert (stuck.grad_norm < 1e-2).all()


def trained_policy(length: int = 2, n_inputs: int = 3, vocab: int = 3, steps: int = 3):
    torch.manual_seed(1)
    outputs = enumerable.all_outputs(vocab, length)
    x = torch.arange(n_inputs)
    rewards = torch.rand(n_inputs, outputs.shape[0]) * 2 - 1
    policy = enumerable.PrefixMLPPolicy(n_inputs, vocab, length, hidden=8)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    for _ in range(steps):  # move away from the uniform initial policy
        loss = -enumerable.sequence_logprobs(policy, x, outputs, 1.0)[:, 0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy, x, outputs, rewards


def test_value_grad_norms_match_a_plain_autograd_loop() -> None:
    policy, x, outputs, rewards = trained_policy()
    tau = 0.5
    fast = enumerable.value_grad_norms(policy, x, outputs, rewards, tau)
    for i in range(x.shape[0]):
        # V(x_i) = Σ_y r(x_i, y) Π_l softmax(f(x_i, y_<l)/τ)[y_l], one token at a time
        value = torch.zeros(())
        for m, y in enumerate(outputs.tolist()):
            logp = torch.zeros(())
            for l in range(len(y)):
                feats = policy.features(x[i : i + 1], torch.tensor([y[:l]], dtype=torch.long))
                logp = logp + torch.log_softmax(policy(feats)[0] / tau, -1)[y[l]]
            value = value + logp.exp() * rewards[i, m]
        grads = torch.autograd.grad(value, list(policy.parameters()))
        oracle = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert oracle.item() > 1e-3  # a meaningful comparison, not 0 vs 0
        torch.testing.assert_close(fast[i], oracle, rtol=1e-4, atol=0)


def test_constant_reward_gives_zero_gradient_and_zero_std() -> None:
    policy, x, outputs, _ = trained_policy()
    constant = torch.full((x.shape[0], outputs.shape[0]), 0.3)
    with torch.no_grad():
        mean, std = enumerable.value_and_std(enumerable.sequence_logprobs(policy, x, outputs, 1.0), constant)
    torch.testing.assert_close(mean, torch.full_like(mean, 0.3))
    assert std.max().item() < 1e-3
    assert enumerable.value_grad_norms(policy, x, outputs, constant, 1.0).max().item() < 1e-5


def test_gamma_against_explicit_jacobians() -> None:
    length, vocab, tau = 2, 3, 0.5
    policy, x, _, _ = trained_policy(length=length, vocab=vocab)
    gam = enumerable.gamma(policy, x, vocab, length, tau)
    names, params = zip(*[(k, v.detach()) for k, v in policy.named_parameters()], strict=True)
    i = 1
    norms = []
    prefixes = [()] + [tuple(p) for p in itertools.product(range(vocab), repeat=length - 1)]
    for prefix in prefixes:
        feats = policy.features(x[i : i + 1], torch.tensor([list(prefix)], dtype=torch.long))

        def logits(*ps: torch.Tensor, feats: torch.Tensor = feats) -> torch.Tensor:
            return functional_call(policy, dict(zip(names, ps, strict=True)), (feats,))[0] / tau

        jac = jacobian(logits, params)  # per parameter: (V, *param_shape)
        full = torch.cat([j.reshape(vocab, -1) for j in jac], dim=1)  # (V, P)
        norms.append(torch.linalg.svdvals(full)[0].item())
    assert len(norms) == 1 + vocab
    assert gam[i].item() >= max(norms) * (1 - 1e-5)  # γ is a max over prefixes ...
    assert gam[i].item() == pytest.approx(max(norms), rel=1e-4)  # ... and attained by one of them


class _StopAfterFirstCheckpoint(results.Run):
    """A run handle that dies right after the experiment's first checkpoint, like a kill would."""

    def save_checkpoint(self, state: dict) -> None:
        super().save_checkpoint(state)
        raise KeyboardInterrupt


def test_resume_skips_finished_lengths_and_matches_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make() -> results.Run:
        return results.create_run(experiment="theorem-bound", version=1, preset="smoke", cfg=SMOKE,
                                  out_root=tmp_path, device="cpu", argv=[])

    reference = make()
    theorem_bound.run(SMOKE, reference)
    reference.finish("complete")

    first = make()
    interrupted = _StopAfterFirstCheckpoint(first.path, first.meta)
    with pytest.raises(KeyboardInterrupt):
        theorem_bound.run(SMOKE, interrupted)
    assert results.read_metrics(first.path).output_len.tolist() == [1]

    lengths_trained = []

    class Spy(enumerable.PrefixMLPPolicy):
        def __init__(self, n_inputs: int, vocab_size: int, max_len: int, hidden: int) -> None:
            lengths_trained.append(max_len)
            super().__init__(n_inputs, vocab_size, max_len, hidden)

    monkeypatch.setattr(enumerable, "PrefixMLPPolicy", Spy)
    resumed = results.reopen_run(first.path, [])
    theorem_bound.run(SMOKE, resumed)
    resumed.finish("complete")
    assert lengths_trained == [2]  # length 1 came from the checkpoint
    assert "resuming after output lengths [1]" in (first.path / "log.txt").read_text()
    pd.testing.assert_frame_equal(results.read_table(first.path, "inputs"),
                                  results.read_table(reference.path, "inputs"))
    pd.testing.assert_frame_equal(results.read_metrics(first.path), results.read_metrics(reference.path))
