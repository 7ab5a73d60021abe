"""Configuration dataclasses of the finetuning loops (pure Python: experiments import them at top level)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 10  # samples per input for the per-input statistics (paper: 10)
    temperature: float = 1.0  # sampling temperature τ
    # top-k truncation while sampling (-1 = the task's GRUE-style setting, 0 = none). Default 0: log-probs are
    # those of the untruncated policy, and PPO on top-k samples pushes mass into the never-sampled tail
    # (entropy grows, reward falls) on small models.
    top_k: int = 0
    max_new_tokens: int = 0  # 0 = the task's setting
    min_new_tokens: int = -1  # -1 = the task's setting
    batch_size: int = 64  # prompts per generate call (batch_size·k sequences)


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 150  # optimizer steps of cross-entropy on the references
    batch_size: int = 16  # (prompt, reference) pairs per step
    lr: float = 1e-3  # AdamW learning rate


@dataclass(frozen=True)
class RFTConfig:
    algorithm: Literal["ppo", "reinforce"] = "ppo"  # PPO as RL4LMs runs it, or REINFORCE with a baseline
    steps: int = 150  # rollout + update iterations
    batch_prompts: int = 16  # prompts per rollout
    k: int = 4  # samples per prompt in a rollout
    lr: float = 3e-5  # AdamW learning rate (policy and value head)
    temperature: float = 1.0  # rollout sampling temperature
    baseline: Literal["none", "mean", "rloo"] = "rloo"  # REINFORCE baseline over the K samples of an input
    normalize_std: bool = False  # REINFORCE: divide advantages by the group std (GRPO); False = Dr. GRPO
    critic: Literal["separate", "shared"] = "shared"  # PPO value model: a head on the policy, or a copy (RL4LMs)
    ppo_epochs: int = 2  # PPO passes over each rollout (RL4LMs: 5)
    minibatch_size: int = 32  # PPO minibatch (sequences)
    clip: float = 0.2  # PPO ratio clip ε
    vf_coef: float = 0.5  # value loss weight
    gamma: float = 0.99  # GAE discount
    lam: float = 0.95  # GAE λ
    kl_init: float = 0.001  # initial per-token KL coefficient β to the reference (RL4LMs NarrativeQA: 0.001)
    kl_target: float = 1.0  # target KL of the adaptive controller (None-like 0 = fixed β)
    ent_coef: float = 0.0  # entropy bonus coefficient
    max_grad_norm: float = 0.5  # gradient clipping (RL4LMs: 0.5)
    # REINFORCE with dynamic sampling (DAPO; verl ``algorithm.filter_groups``): drop inputs whose K rewards are
    # all equal (zero advantage, zero gradient) and draw fresh prompts to refill the batch (read by
    # rftlab.rl.train.dynamic_sampling_step; reinforce_step and ppo_step ignore it)
    filter_zero_std: bool = False
    max_resample_rounds: int = 3  # dynamic sampling: extra rollouts of fresh prompts per step, at most
