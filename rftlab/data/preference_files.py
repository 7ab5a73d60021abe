"""Preference pairs from local files: JSONL, JSON, CSV, parquet, a ``datasets`` folder (``save_to_disk``) or a
data set name in the local Hugging Face cache (:mod:`rftlab.data.records`).

Rows need ``prompt``, ``chosen`` and ``rejected`` columns (TRL's preference format). Standard rows hold strings;
conversational rows (lists of ``{"role", "content"}`` messages) are rendered with the tokenizer's chat template
when a tokenizer with one is given, else flattened by joining the message contents with newlines. Errors are
one-line RftlabErrors that say what to fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rftlab.data.records import prompt_and_completions, read_records, require_columns
from rftlab.errors import RftlabError

__all__ = ["PreferencePair", "load_preference_pairs"]

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    row: int = -1  # the row of the source file it came from


def load_preference_pairs(path: str | Path, n: int = 0, seed: int = 0, tokenizer=None) -> list[PreferencePair]:
    """The pairs in ``path``; ``n`` > 0 keeps a random subset of n (seeded), in file order. ``tokenizer``: its
    chat template renders conversational rows."""
    rows = read_records(path, "preference pairs")
    require_columns(rows, COLUMNS, path, "preference pairs")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n)) if 0 < n < len(rows) else range(len(rows))
    pairs = []
    for i in keep:
        row = rows[i]
        try:
            prompt, (chosen, rejected) = prompt_and_completions(row["prompt"], [row["chosen"], row["rejected"]],
                                                                tokenizer)
        except ValueError as err:
            raise RftlabError(f"{path}, row {i}: {err}.") from None
        pairs.append(PreferencePair(prompt, chosen, rejected, i))
    return pairs
