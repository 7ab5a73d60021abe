"""Losses and estimators of reinforcement and supervised finetuning, as pure functions of tensors.

Shapes: B prompts (or sequences), K samples per prompt, T response positions, V vocabulary entries.
A ``mask`` (B, T), bool or float, marks the response tokens that count; every masked mean is over the
tokens it marks (token-level average over the whole batch, as RL4LMs' PPO and HF's cross-entropy do).

Three families:

* SFT: token-level NLL of the references (``sft_loss``).
* REINFORCE on K samples per prompt (Razin et al. 2024's sampled RFT; RLOO, GRPO, Dr. GRPO):
  ``reinforce_advantages`` → ``reinforce_loss``, with TRL-named group statistics ``group_reward_stats``.
  Vanishing gradients show up here as exactly zero advantages: a prompt whose K samples share one
  reward has no signal under any group baseline (paper Theorem 1, the sampled version of std_k r = 0).
* PPO as RL4LMs runs it for the paper's GRUE experiments (digest §3.3): per-token KL-penalised rewards
  with the task score at the last token, GAE(γ=0.99, λ=0.95), clipped surrogate, (optionally clipped)
  value loss, exact token entropy, and RL4LMs' adaptive KL coefficient. Statistics use TRL's names
  (``policy/clipfrac``, ``policy/approxkl``) with RL4LMs' definitions; each docstring says which.

Statistics come back as plain Python floats keyed by metric name, ready for the results store.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "gae",
    "group_reward_stats",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_advantages",
    "reinforce_loss",
    "sft_loss",
    "token_entropy",
    "zero_std_groups",
]

Baseline = Literal["none", "mean", "rloo"]


# --------------------------------------------------------------------------------------------- masks
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Σ mask·x / Σ mask over ``dim`` (all entries when None): x (B, T), mask (B, T) or broadcastable to x.

    The mask is read as a selection (nonzero = keep), not as weights. Masked-out entries are selected
    away with ``torch.where`` rather than multiplied by 0, so a padded position holding −inf or nan
    (log-probs of padding) cannot poison the sum. An empty mask gives nan (0/0), as in TRL: an average
    over nothing is a bug upstream, not a zero.
    """
    keep = mask.bool()
    total = torch.where(keep, x, x.new_zeros(()))
    count = keep.expand(total.shape).to(total.dtype)
    if dim is None:
        return total.sum() / count.sum()
    return total.sum(dim) / count.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (all of them pooled), with Bessel's n/(n−1) when ``unbiased``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().expand(x.shape).sum().to(x.dtype)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Advantage normalisation over the masked entries: (x − μ) / (σ + eps), (B, T) → (B, T).

    μ and the unbiased σ pool every masked token of the batch, as RL4LMs/SB3 normalise a minibatch of
    token transitions (``(A − A.mean()) / (A.std() + 1e-8)``; TRL's ``masked_whiten`` uses rsqrt(σ² + 1e-8),
    the same up to ~eps). ``shift_mean=False`` adds μ back (only rescales). Masked-out entries are 0.
    """
    mean, std = masked_mean(x, mask), masked_var(x, mask).sqrt()
    whitened = (x - mean) / (std + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, whitened.new_zeros(()))


# ----------------------------------------------------------------------------------------------- SFT
def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Supervised finetuning loss: −mean over response tokens of log π(y_t | x, y_<t), (B, T), (B, T) → ().

    ``logprobs`` are the log-probabilities of the reference tokens. This equals
    ``F.cross_entropy(logits, targets, ignore_index=-100)`` with non-response targets set to −100.
    """
    return -masked_mean(logprobs, mask)


# ---------------------------------------------------------------------------------------- REINFORCE
def _constant_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(B, K) → (B,) bool: True where all K rewards of a prompt are equal (exactly, not up to rounding)."""
    return rewards.amax(-1) == rewards.amin(-1)


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(B, K) → (B,) bool: the inputs whose K rewards are all equal, which a mean or rloo baseline gives zero
    advantage (TRL's ``frac_reward_zero_std`` is their share; DAPO's dynamic sampling drops them)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, K), got shape {tuple(rewards.shape)}")
    return _constant_groups(rewards)


def reinforce_advantages(rewards: torch.Tensor, baseline: Baseline = "mean", normalize_std: bool = False,
                         eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages from K sampled rewards per prompt, (B, K) → (B, K).

    * ``none``: A_k = r_k (plain REINFORCE, Williams 1992).
    * ``mean``: A_k = r_k − (1/K) Σ_j r_j (group-mean baseline; GRPO without std scaling = Dr. GRPO).
    * ``rloo``: A_k = r_k − 1/(K−1) Σ_{j≠k} r_j = K/(K−1) · (r_k − mean_j r_j) (leave-one-out, Kool et al.
      2019, TRL RLOOTrainer); unbiased because the baseline does not depend on sample k.
    * ``normalize_std``: divide by (σ_group + eps), σ the unbiased std of the prompt's K rewards (GRPO,
      Shao et al. 2024, TRL ``scale_rewards="group"``). Dr. GRPO (Liu et al. 2025) drops this scaling.

    With a mean or rloo baseline, a prompt whose K rewards are all equal gets advantages of exactly 0
    (set explicitly: r − mean(r) is not always 0.0 in floating point), hence exactly zero gradient — the
    sampled face of the paper's vanishing gradient for inputs with reward std 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, K), got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if baseline == "none":
        advantages = rewards.clone()
    elif baseline in ("mean", "rloo"):
        if baseline == "rloo" and k < 2:
            raise ValueError("the leave-one-out baseline needs K >= 2 samples per prompt")
        centred = rewards - rewards.mean(-1, keepdim=True)
        if baseline == "rloo":
            centred = centred * (k / (k - 1))
        advantages = torch.where(_constant_groups(rewards)[:, None], torch.zeros_like(centred), centred)
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose none, mean or rloo")
    if normalize_std:
        if k < 2:
            raise ValueError("normalize_std needs K >= 2 samples per prompt")
        advantages = advantages / (rewards.std(-1, keepdim=True) + eps)
    return advantages


def reinforce_loss(seq_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate −mean_{b,k} A_bk · log π(y_bk | x_b), (B, K), (B, K) → ().

    ``seq_logprobs`` is the summed token log-probability of each sampled response; its gradient is the
    Monte-Carlo policy gradient −∇V estimate. Advantages are detached (they are weights, not a path).
    """
    return -(advantages.detach() * seq_logprobs).mean()


def group_reward_stats(rewards: torch.Tensor, unbiased: bool = True) -> dict[str, float]:
    """TRL GRPO-style statistics of K sampled rewards per prompt, (B, K) → dict.

    ``reward/mean``: mean of all B·K rewards; ``reward/std``: mean over prompts of the within-prompt std
    (unbiased by default, as TRL); ``frac_reward_zero_std``: fraction of prompts whose K rewards are all
    equal (exact equality, so it counts the prompts that ``reinforce_advantages`` gives zero advantage).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, K), got shape {tuple(rewards.shape)}")
    rewards = rewards.detach().double()
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(-1, correction=int(unbiased)).mean().item(),
        "frac_reward_zero_std": _constant_groups(rewards).double().mean().item(),
    }


# ---------------------------------------------------------------------------------------------- PPO
def kl_penalized_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Per-token rewards of RL4LMs' PPO: r_t = −β (log π(y_t) − log π_ref(y_t)) + score·[t = last], (B, T).

    ``score`` (B,) is the task reward of each whole response, given at its last response token (the
    last position where ``mask`` is set, rows may be ragged); the KL term is the sampled log-ratio of
    each token (RL4LMs ``kl_div = raw_log_probs − ref_log_probs``). Masked-out positions get 0, and a
    row with no response token gets no score. ``beta`` is a float or a (B,)/(B, 1) tensor.
    """
    keep = mask.bool()
    if isinstance(beta, torch.Tensor) and beta.dim() == 1:
        beta = beta[:, None]
    kl = logprobs - ref_logprobs
    rewards = torch.where(keep, -beta * kl, kl.new_zeros(()))
    positions = torch.arange(mask.shape[1], device=mask.device)
    # the last set position of each row is the largest index among the set ones
    last = torch.where(keep, positions, -1).amax(-1)
    has_tokens = last >= 0
    add = torch.where(has_tokens, score.to(rewards.dtype), rewards.new_zeros(()))
    return rewards.scatter_add(1, last.clamp_min(0)[:, None], add[:, None])


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 0.99,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), (B, T) ×3 → advantages (B, T), returns (B, T).

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    R_t = A_t + V_t,

    with V and A set to 0 past the end of each response (the episode terminates at its last token, as
    in RL4LMs, so the bootstrap value there is 0). Each row's mask must be one contiguous block (a
    left offset and right padding are fine); a 0 ends the episode. λ=1, γ=1 gives reward-to-go − V;
    λ=0 gives the one-step TD error. Outputs are 0 at masked positions and carry no gradient (targets).

    The recursion runs backwards over the T time steps in a Python loop (T ≤ ~128 response tokens) and
    is vectorised over the batch; a closed form would need a (T, T) discount matrix for no real gain.
    """
    keep = mask.bool()
    rewards, values = torch.where(keep, rewards, 0.0), torch.where(keep, values, 0.0)
    keep = keep.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # multiplying by the mask resets the recursion at padding, so rows of any length share one loop
        running = (delta + gamma * lam * running) * keep[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    returns = (advantages + values) * keep
    return advantages, returns


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017) over response tokens, (B, T) ×4 → (loss (), stats).

        ρ_t = exp(log π(y_t) − log π_old(y_t)),   loss = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)).

    Stats (TRL names, RL4LMs/SB3 definitions): ``policy/clipfrac`` = fraction of tokens with
    |ρ − 1| > ε (TRL instead counts tokens where the clipped term is the active max);
    ``policy/approxkl`` = mean((ρ − 1) − log ρ), Schulman's unbiased k3 estimate of KL(π_old‖π) (TRL
    logs 0.5·mean(log ρ)²); also ``loss/policy`` and ``val/ratio`` (mean ρ). ``old_logprobs`` and
    ``advantages`` are detached.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "loss/policy": loss.item(),
            "policy/clipfrac": masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask).item(),
            "policy/approxkl": masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "val/ratio": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_value: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Value-head loss of RL4LMs/SB3 PPO: mean_t (R_t − V̂_t)², (B, T) ×4 → (loss (), stats).

    V̂ = V without clipping (``clip_value=None``, RL4LMs' default), else V_old + clip(V − V_old, ±c).
    As in SB3 the clipped prediction replaces V (TRL instead takes 0.5·max of the clipped and unclipped
    squared errors); the caller multiplies by vf_coef (0.5 in RL4LMs). Stats: ``loss/value``,
    ``val/clipfrac`` (fraction with |V − V_old| > c; 0 without clipping), ``val/vpred`` (mean V),
    ``val/error`` (mean unclipped squared error).
    """
    old_values, returns = old_values.detach(), returns.detach()
    predicted = values if clip_value is None else old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    loss = masked_mean((returns - predicted) ** 2, mask)
    with torch.no_grad():
        clipped = (torch.zeros_like(values, dtype=torch.bool) if clip_value is None
                   else (values - old_values).abs() > clip_value)
        stats = {
            "loss/value": loss.item(),
            "val/clipfrac": masked_mean(clipped.to(values.dtype), mask).item(),
            "val/vpred": masked_mean(values, mask).item(),
            "val/error": masked_mean((returns - values) ** 2, mask).item(),
        }
    return loss, stats


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy of each next-token distribution, H = logsumexp(z) − Σ_v softmax(z)_v z_v: (B, T, V) → (B, T)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean exact token entropy over response positions, (B, T, V), (B, T) → (); RL4LMs' entropy loss is −this."""
    return masked_mean(token_entropy(logits), mask)


class FixedKLController:
    """Constant KL coefficient β (``update`` is a no-op that returns β)."""

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, kl: float, n_steps: int = 1) -> float:
        return self.beta


class AdaptiveKLController:
    """Proportional controller of the KL coefficient towards a target KL (Ziegler et al. 2019).

    RL4LMs (``kl_controllers.py``, the paper's PPO; digest §3.3), after each rollout with mean per-token
    KL = mean_t (log π − log π_ref):

        e = clip((KL − target) / target, −0.2, 0.2),    β ← β · (1 + 0.1 · e),

    so one update moves β by at most ±2%. With ``horizon`` set, the factor 0.1 becomes n_steps / horizon
    (Ziegler et al.; TRL's ``AdaptiveKLController``, where n_steps is the batch size of the update).
    """

    def __init__(self, init_beta: float, target: float, horizon: int | None = None) -> None:
        if target <= 0:
            raise ValueError(f"the target KL must be positive, got {target}")
        self.beta, self.target, self.horizon = float(init_beta), float(target), horizon

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Adapt β to the observed mean KL and return the new β."""
        error = min(max((float(kl) - self.target) / self.target, -0.2), 0.2)
        gain = 0.1 if self.horizon is None else n_steps / self.horizon
        self.beta *= 1.0 + gain * error
        return self.beta
