"""Preference pairs with a controlled edit distance: rejected = chosen with k of its n tokens substituted.

Yuan et al. (arXiv 2410.13828, §4) trace gradient entanglement to the tokens two responses share: the more
of them, the closer cos(g_w, g_l) gets to 1. These pairs isolate that variable. Each chosen response is cut
to exactly n tokens; the rejected one replaces k of them, at positions drawn uniformly without replacement,
by a different token drawn from ``pool``; the other n − k tokens stay in place, so the shared-token fraction
is (n − k)/n. Works on any token type (ids or words); pure Python, a function of the seed.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["EditPair", "make_edit_pairs", "substitute"]


@dataclass(frozen=True)
class EditPair:
    prompt: tuple  # prompt tokens
    chosen: tuple  # the n chosen tokens
    rejected: tuple  # chosen with k positions substituted
    k: int  # substituted tokens

    @property
    def shared_fraction(self) -> float:
        """(n − k)/n: the share of positions where chosen and rejected hold the same token."""
        return 1.0 - self.k / len(self.chosen)


def substitute(tokens: Sequence[Hashable], k: int, pool: Sequence[Hashable], rng: random.Random) -> tuple:
    """``tokens`` with k positions (uniform, distinct) replaced by tokens of ``pool`` that differ from the original."""
    if not 0 <= k <= len(tokens):
        raise ValueError(f"k={k} substitutions do not fit a response of {len(tokens)} tokens")
    out = list(tokens)
    for i in rng.sample(range(len(tokens)), k):
        choices = [t for t in pool if t != tokens[i]]
        if not choices:
            raise ValueError("the substitution pool needs a token that differs from the original")
        out[i] = rng.choice(choices)
    return tuple(out)


def make_edit_pairs(prompts: Sequence[Sequence[Hashable]], responses: Sequence[Sequence[Hashable]], n: int,
                    ks: Sequence[int], pool: Sequence[Hashable], seed: int) -> list[EditPair]:
    """For every (prompt, response) with at least n tokens and every k in ``ks``: one pair whose chosen is the
    response's first n tokens and whose rejected substitutes k of them. The same responses serve every k, so
    κ against the shared fraction compares the same texts."""
    if any(not 0 < k <= n for k in ks):
        raise ValueError(f"every k must be in 1..{n}, got {list(ks)}")
    rng = random.Random(f"edit-pairs-{seed}")
    pool = sorted(set(pool), key=str)
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        if len(response) < n:
            continue
        chosen = tuple(response[:n])
        out += [EditPair(tuple(prompt), chosen, substitute(chosen, k, pool, rng), k) for k in ks]
    return out
