"""rft-vs-sft-theory (Razin et al. 2024, §4.3): closed-form logit gradients, the gradient-flow integrator
against the exact solution, and the smoke preset end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from rftlab import config, tabular
from rftlab.cli import app
from rftlab.errors import RftlabError
from rftlab.experiments import rft_vs_sft_theory


def one_hot_reward(num_labels: int, label: int = 0) -> torch.Tensor:
    rewards = torch.zeros(num_labels, dtype=torch.float64)
    rewards[label] = 1.0
    return rewards


def test_logit_gradients_match_autograd_and_closed_forms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    label = 2
    rewards = one_hot_reward(6, label)
    p = torch.softmax(logits, -1)[0, label].item()

    (autograd_rft,) = torch.autograd.grad(tabular.expected_reward(logits, rewards).sum(), logits)
    rft = tabular.rft_logit_grad(logits.detach(), rewards)
    torch.testing.assert_close(rft, autograd_rft)
    assert rft[0, label].item() == pytest.approx(p * (1 - p), rel=1e-12)  # = STD² for a 0/1 reward
    std = tabular.reward_std(logits.detach(), rewards).item()
    assert std == pytest.approx((p * (1 - p)) ** 0.5, rel=1e-12)

    (autograd_sft,) = torch.autograd.grad(torch.log_softmax(logits, -1)[0, label], logits)
    sft = tabular.sft_logit_grad(logits.detach(), label)
    torch.testing.assert_close(sft, autograd_sft)
    assert sft[0, label].item() == pytest.approx(1 - p, rel=1e-12)


def test_rft_gradient_matches_autograd_for_general_rewards() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    rewards = torch.rand(4, 5, dtype=torch.float64) * 2 - 1
    (expected,) = torch.autograd.grad(tabular.expected_reward(logits, rewards).sum(), logits)
    torch.testing.assert_close(tabular.rft_logit_grad(logits.detach(), rewards), expected)


def test_initial_logits_set_correct_prob_and_keep_wrong_label_distribution() -> None:
    correct = torch.tensor([1e-6, 1e-3, 0.3], dtype=torch.float64)
    others = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    logits = tabular.logits_with_correct_prob(correct, others, label=1)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(probs[:, 1], correct)
    wrong = probs[:, [0, 2, 3]]
    torch.testing.assert_close(wrong / wrong.sum(-1, keepdim=True), torch.softmax(others, -1).expand(3, -1))


@pytest.mark.parametrize("method", ["rft", "sft"])
def test_flow_matches_exact_solution_and_step_halving(method: str) -> None:
    """Wrong labels sharing one logit reduce the flow to a 1-D ODE with a closed-form hitting time."""
    num_labels, target = 4, 0.5
    initial = torch.logspace(-6, -1, 6, dtype=torch.float64)
    rewards = one_hot_reward(num_labels)
    grad_fn = {"rft": lambda th: tabular.rft_logit_grad(th, rewards),
               "sft": lambda th: tabular.sft_logit_grad(th, 0)}[method]

    def hitting_times(other_logits: torch.Tensor, step: float) -> torch.Tensor:
        logits = tabular.logits_with_correct_prob(initial, other_logits)
        flow = tabular.time_to_target(logits, grad_fn, lambda th: tabular.expected_reward(th, rewards),
                                      target, max_logit_change=step, max_steps=10_000)
        assert not torch.isnan(flow.hit_time).any()
        return flow.hit_time

    exact = torch.tensor([tabular.closed_form_time(p, target, num_labels, method) for p in initial.tolist()],
                         dtype=torch.float64)
    simulated = hitting_times(torch.zeros(num_labels - 1, dtype=torch.float64), 0.05)
    assert (simulated / exact - 1).abs().max() < 1e-3
    if method == "rft":  # the exact RFT time is ≈ 1/(c·p0), c = K/(K − 1)
        assert exact[0].item() == pytest.approx(0.75e6, rel=1e-4)

    uneven = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)  # no closed form: halve the step instead
    coarse, fine = hitting_times(uneven, 0.05), hitting_times(uneven, 0.025)
    assert (coarse / fine - 1).abs().max() < 1e-3


def test_smoke_preset_through_cli(tmp_path: Path) -> None:
    argv = ["run", "rft-vs-sft-theory", "--preset", "smoke", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "rft-vs-sft-theory").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["status"] == "complete"
    assert (run_dir / "figures" / "rft_vs_sft_theory.png").stat().st_size > 10_000

    metrics = pd.read_parquet(run_dir / "metrics.parquet").set_index("method")
    rft, sft = metrics.loc["rft"], metrics.loc["sft"]
    assert -2.5 <= rft.loglog_slope <= -1.5
    assert rft.loglog_r2 > 0.99
    assert sft.loglog_slope > -0.5
    assert sft.ln_r2 > 0.99  # time is affine in ln(1/STD): logarithmic growth
    assert sft.ln_slope == pytest.approx(2 * (5 - 1) / 5, rel=0.15)  # 2/c for K = 5 labels

    inputs = pd.read_parquet(run_dir / "inputs.parquet")
    assert {"method", "input", "initial_reward", "initial_reward_std", "time_to_target"} <= set(inputs)
    assert len(inputs) == 2 * 7 and inputs.reached.all()
    times = inputs.pivot(index="input", columns="method", values="time_to_target")
    assert (times.rft > times.sft).all()
    assert times.rft[0] > 1000 * times.sft[0]  # input 0 has the smallest initial std (p = 1e-5)
    curves = pd.read_parquet(run_dir / "curves.parquet")
    assert set(curves.method) == {"rft", "sft"} and curves.input.nunique() == 3


def test_config_rejects_initial_reward_above_target() -> None:
    with pytest.raises(RftlabError, match="max_initial_reward < target_reward"):
        config.resolve(rft_vs_sft_theory.Config, [], ["max_initial_reward=0.6"])
