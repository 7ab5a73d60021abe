"""Tabular softmax policies under gradient flow: exact RFT and SFT dynamics (Razin et al. 2024, §4.3).

Setting. A linear policy p_θ(·|x) = softmax(W x) over K labels with orthonormal inputs x_1..x_N: the
logits θ_x = W x_i ∈ R^K of different inputs are independent coordinates of W, and under gradient flow
on Σ_x objective(x) each θ_x follows its own ODE. (For the mean over N inputs, time is multiplied by N
for every input alike.) So N inputs are simulated as one (N, K) tensor, one tensor op per step.

With a reward vector r ∈ R^K per input (0/1 here: r = onehot(y*)):

- RFT ascends the exact expected reward V(x) = Σ_y p_y r_y:    dθ/dt = ∇_θ V = p ⊙ (r − V);
  for 0/1 rewards V = p* := p(y*|x) and the y* coordinate is p*(1 − p*) = STD².
- SFT descends the cross-entropy −ln p(y*|x):                     dθ/dt = onehot(y*) − p;
  the y* coordinate is 1 − p*.

With 0/1 rewards the reward std is STD = sqrt(p*(1 − p*)). When the K − 1 wrong labels share one logit,
p* = σ(z − ln(K − 1)) with z = θ_y* − θ_other, and the ODEs reduce to dp*/dt = c·p*²(1 − p*)² (RFT)
and dp*/dt = c·p*(1 − p*)² (SFT) with c = K/(K − 1); :func:`closed_form_time` integrates them:
RFT needs time ≈ 1/(c·p*(0)) ≈ 1/(c·STD²), SFT ≈ ln(1/p*(0))/c ≈ 2·ln(1/STD)/c.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GradFn = Callable[[torch.Tensor], torch.Tensor]


def expected_reward(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """V = Σ_y softmax(θ)_y r_y: logits (N, K), rewards (K,) or (N, K) → (N,)."""
    return (torch.softmax(logits, -1) * rewards).sum(-1)


def reward_std(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """STD_y~p[r] = sqrt(Σ_y p_y r_y² − V²): logits (N, K), rewards (K,) or (N, K) → (N,)."""
    probs = torch.softmax(logits, -1)
    mean = (probs * rewards).sum(-1)
    return ((probs * rewards**2).sum(-1) - mean**2).clamp_min(0).sqrt()


def rft_logit_grad(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """∇_θ V(θ) = p ⊙ (r − V), the exact (expected) policy gradient on the logits: (N, K) → (N, K)."""
    probs = torch.softmax(logits, -1)
    value = (probs * rewards).sum(-1, keepdim=True)
    return probs * (rewards - value)


def sft_logit_grad(logits: torch.Tensor, label: int) -> torch.Tensor:
    """∇_θ ln p(y*|θ) = onehot(y*) − p, the negative cross-entropy gradient: (N, K) → (N, K)."""
    grad = -torch.softmax(logits, -1)
    grad[:, label] += 1
    return grad


def logits_with_correct_prob(correct_probs: torch.Tensor, other_logits: torch.Tensor,
                             label: int = 0) -> torch.Tensor:
    """Logits (N, K) giving p(y*|x) = correct_probs (N,) while the K − 1 wrong labels keep the
    distribution softmax(other_logits) (other_logits: (K − 1,)), whatever p(y*|x) is.

    θ_y* = ln(p*/(1 − p*)) + logsumexp(other_logits), so p* = e^θ_y* / (e^θ_y* + Σ_j e^θ_j).
    """
    n = correct_probs.shape[0]
    others = other_logits.to(correct_probs.dtype).expand(n, -1)
    target = torch.log(correct_probs / (1 - correct_probs)) + torch.logsumexp(others, -1)
    return torch.cat([others[:, :label], target[:, None], others[:, label:]], dim=1)


@dataclass
class FlowResult:
    """Output of :func:`time_to_target`.

    hit_time: (N,) gradient-flow time at which V first reaches the target (NaN if never reached);
    steps: (N,) integrator steps taken until then; trace_time / trace_value: (S, M) time and V after
    each step for the M traced inputs (rows after an input is done repeat its last values).
    """

    hit_time: torch.Tensor
    steps: torch.Tensor
    trace_time: torch.Tensor
    trace_value: torch.Tensor


def time_to_target(logits: torch.Tensor, grad_fn: GradFn, value_fn: GradFn, target: float, *,
                   max_logit_change: float, max_steps: int, trace: torch.Tensor | None = None) -> FlowResult:
    """Integrate the gradient flow dθ/dt = grad_fn(θ) for every row of ``logits`` (N, K) until
    value_fn(θ) (N,) reaches ``target``, and return each row's first hitting time.

    Integrator: explicit midpoint (RK2) with a per-row step dt = max_logit_change / ‖grad_fn(θ)‖_∞, so
    no logit moves by more than about ``max_logit_change`` per step. Time is a free variable of the
    flow, so a row whose gradient is tiny (RFT at small reward std) takes proportionally longer steps:
    the step count grows like ln(1/p*) instead of 1/p*, while each step is as accurate as a step of
    fixed length in logit space (relative time error O(max_logit_change²)). The crossing time inside
    the last step is interpolated linearly in V. Rows that reached the target stop moving.
    ``trace``: indices (M,) of rows whose (t, V) are recorded after every step.
    """
    theta = logits.clone()
    n = theta.shape[0]
    value = value_fn(theta)
    time = torch.zeros(n, dtype=theta.dtype)
    done = value >= target
    hit_time = torch.where(done, torch.zeros_like(time), torch.full_like(time, math.nan))
    steps = torch.zeros(n, dtype=torch.long)
    trace = torch.zeros(0, dtype=torch.long) if trace is None else trace
    trace_time, trace_value = [time[trace].clone()], [value[trace].clone()]
    for _ in range(max_steps):
        if bool(done.all()):
            break
        grad = grad_fn(theta)
        dt = max_logit_change / grad.abs().amax(-1).clamp_min(torch.finfo(theta.dtype).tiny)
        dt = torch.where(done, torch.zeros_like(dt), dt)
        theta = theta + dt[:, None] * grad_fn(theta + 0.5 * dt[:, None] * grad)
        new_value = value_fn(theta)
        crossed = ~done & (new_value >= target)
        fraction = ((target - value) / (new_value - value)).clamp(0, 1)
        hit_time = torch.where(crossed, time + fraction * dt, hit_time)
        steps += (~done).long()
        time, value, done = time + dt, new_value, done | crossed
        trace_time.append(time[trace].clone())
        trace_value.append(value[trace].clone())
    return FlowResult(hit_time, steps, torch.stack(trace_time), torch.stack(trace_value))


def closed_form_time(p0: float, target: float, num_labels: int, method: str) -> float:
    """Exact gradient-flow time for p* to go from p0 to target when the K − 1 wrong labels share one
    logit (0/1 reward), with c = K/(K − 1):

    RFT: ∫ dp / (c p²(1−p)²) = [F(target) − F(p0)]/c,  F(p) = −1/p + 1/(1−p) + 2 ln(p/(1−p));
    SFT: ∫ dp / (c p(1−p)²)  = [G(target) − G(p0)]/c,  G(p) = ln(p/(1−p)) + 1/(1−p).
    """
    c = num_labels / (num_labels - 1)

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    def rft(p: float) -> float:
        return -1 / p + 1 / (1 - p) + 2 * logit(p)

    def sft(p: float) -> float:
        return logit(p) + 1 / (1 - p)

    antiderivatives = {"rft": rft, "sft": sft}
    if method not in antiderivatives:
        raise ValueError(f"method must be 'rft' or 'sft', not {method!r}")
    return (antiderivatives[method](target) - antiderivatives[method](p0)) / c
