"""Exact quantities for tiny autoregressive softmax policies whose outputs can all be enumerated.

The policy is p_θ(y|x) = ∏_{l=1..L} softmax(f_θ(x, y_{<l}) / τ)_{y_l} over a vocabulary of size V, with
f_θ an MLP on one-hot codes of the input and the prefix. With every output y ∈ V^L listed, the
expected reward V(x;θ) = Σ_y p_θ(y|x) r(x,y), its standard deviation, the exact gradient ∇_θ V(x;θ)
and γ(x;θ) = max_{l, y_{<l}} ‖J_θ f_θ(x, y_{<l})/τ‖₂ (spectral norm of the logits' Jacobian) are all
computed without sampling. These are the quantities of Theorem 1 in Razin et al. (ICLR 2024).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


def all_outputs(vocab_size: int, length: int) -> torch.Tensor:
    """Every output sequence, shape (V**L, L), in lexicographic order."""
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)


def all_prefixes(vocab_size: int, length: int) -> list[torch.Tensor]:
    """Prefixes y_{<l} for l = 1..L: a list of L tensors, entry l of shape (V**l, l) (l = 0 is empty)."""
    return [all_outputs(vocab_size, l) if l else torch.zeros(1, 0, dtype=torch.long) for l in range(length)]


class PrefixMLPPolicy(nn.Module):
    """Logits f_θ(x, y_{<l}) ∈ R^V from one-hot(x) ‖ one-hot of each prefix slot (V+1 symbols, the
    extra one meaning "empty") ‖ one-hot(l), through a 2-layer tanh MLP."""

    def __init__(self, n_inputs: int, vocab_size: int, max_len: int, hidden: int) -> None:
        super().__init__()
        self.n_inputs, self.vocab_size, self.max_len = n_inputs, vocab_size, max_len
        width = n_inputs + max_len * (vocab_size + 1) + max_len
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, vocab_size))

    def features(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """x: (B,) input ids; prefix: (B, l) tokens; returns (B, width) one-hot features."""
        batch, l = prefix.shape
        slots = torch.full((batch, self.max_len), self.vocab_size, dtype=torch.long)
        slots[:, :l] = prefix
        return torch.cat([
            nn.functional.one_hot(x, self.n_inputs),
            nn.functional.one_hot(slots, self.vocab_size + 1).flatten(1),
            nn.functional.one_hot(torch.full((batch,), l), self.max_len),
        ], dim=1).float()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


def sequence_logprobs(policy: PrefixMLPPolicy, x: torch.Tensor, outputs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """log p_θ(y|x) for every input and output: x (N,), outputs (M, L) → (N, M)."""
    n, (m, length) = x.shape[0], outputs.shape
    total = torch.zeros(n, m)
    xs = x.repeat_interleave(m)  # (N·M,)
    for l in range(length):  # L ≤ 4 positions; each position is one batched forward over N·M rows
        prefix = outputs[:, :l].repeat(n, 1)
        logits = policy(policy.features(xs, prefix)) / temperature
        logp = torch.log_softmax(logits, dim=-1).gather(1, outputs[:, l].repeat(n)[:, None])
        total = total + logp.view(n, m)
    return total


def value_and_std(logp: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and population std of the reward under p = exp(logp); both (N, M) → (N,)."""
    p = logp.exp()
    mean = (p * rewards).sum(1)
    var = (p * (rewards - mean[:, None]) ** 2).sum(1)
    return mean, var.clamp_min(0).sqrt()


def value_grad_norms(policy: PrefixMLPPolicy, x: torch.Tensor, outputs: torch.Tensor, rewards: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """‖∇_θ V(x;θ)‖ for each input, shape (N,), from one Jacobian of the vector (V(x_1),…,V(x_N))."""
    params = dict(policy.named_parameters())

    def values(p: dict) -> torch.Tensor:
        model = lambda feats: functional_call(policy, p, (feats,))  # noqa: E731
        logp = sequence_logprobs(_Wrapped(policy, model), x, outputs, temperature)
        return (logp.exp() * rewards).sum(1)

    jac = jacrev(values)(params)  # name -> (N, *param_shape)
    return torch.sqrt(sum(j.flatten(1).pow(2).sum(1) for j in jac.values()))


def gamma(policy: PrefixMLPPolicy, x: torch.Tensor, vocab_size: int, length: int,
          temperature: float) -> torch.Tensor:
    """γ(x;θ) = max over prefixes y_{<l}, l ≤ L, of ‖∂(f_θ(x, y_{<l})/τ)/∂θ‖₂, shape (N,)."""
    params = {k: v.detach() for k, v in policy.named_parameters()}

    def logits(p: dict, feats: torch.Tensor) -> torch.Tensor:
        return functional_call(policy, p, (feats[None],))[0] / temperature

    per_row_jac = vmap(jacrev(logits), in_dims=(None, 0))
    best = torch.zeros(x.shape[0])
    for prefix in all_prefixes(vocab_size, length):
        k = prefix.shape[0]
        feats = policy.features(x.repeat_interleave(k), prefix.repeat(x.shape[0], 1))
        jac = per_row_jac(params, feats)  # name -> (N·K, V, *param_shape)
        full = torch.cat([j.flatten(2) for j in jac.values()], dim=2)  # (N·K, V, P)
        spectral = torch.linalg.matrix_norm(full, ord=2).view(x.shape[0], k)
        best = torch.maximum(best, spectral.max(1).values)
    return best


class _Wrapped:
    """Lets :func:`sequence_logprobs` run a functional call while reusing the module's ``features``."""

    def __init__(self, policy: PrefixMLPPolicy, call) -> None:
        self.features, self._call = policy.features, call

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return self._call(feats)
