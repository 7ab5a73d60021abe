"""Preference pairs from local files: JSONL, JSON, CSV, parquet, or a ``datasets`` folder (``save_to_disk``).

Rows need ``prompt``, ``chosen`` and ``rejected`` columns of strings (TRL's standard preference format). TRL's
conversational format (lists of ``{"role", "content"}`` messages) is flattened by joining the message contents
with newlines; apply a chat template upstream if the model needs one. Errors are one-line RftlabErrors that
say what to fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rftlab.errors import RftlabError

__all__ = ["PreferencePair", "load_preference_pairs"]

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value)
    raise ValueError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict: take "train", else the first split
            data = data["train"] if "train" in data else data[next(iter(data.keys()))]
        return data.to_list()
    if suffix in (".jsonl", ".json"):
        import pandas as pd

        return pd.read_json(path, lines=suffix == ".jsonl").to_dict("records")
    if suffix == ".csv":
        import pandas as pd

        return pd.read_csv(path, keep_default_na=False).to_dict("records")
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    raise RftlabError(f"cannot read preference pairs from {path}: use .jsonl, .json, .csv, .parquet or a "
                      "datasets folder saved with save_to_disk().")


def load_preference_pairs(path: str | Path, n: int = 0, seed: int = 0) -> list[PreferencePair]:
    """The pairs in ``path``; ``n`` > 0 keeps a random subset of n (seeded), in file order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RftlabError(f"preference data {path} does not exist: pass a .jsonl/.csv/.parquet file or a datasets "
                          "folder with prompt, chosen and rejected columns.")
    try:
        rows = _read_rows(path)
    except RftlabError:
        raise
    except Exception as err:  # parser errors of pandas / datasets / json, whatever their type
        raise RftlabError(f"cannot read preference pairs from {path}: {' '.join(str(err).split())[:200]}") from None
    if not rows:
        raise RftlabError(f"{path} holds no preference pairs.")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise RftlabError(f"{path} lacks column(s) {', '.join(missing)}; found {', '.join(map(str, rows[0]))}. "
                          "Preference data needs prompt, chosen and rejected.")
    pairs = []
    for i, row in enumerate(rows):
        try:
            pairs.append(PreferencePair(*(_text(row[c]) for c in COLUMNS)))
        except ValueError as err:
            raise RftlabError(f"{path}, row {i}: {err}.") from None
    if 0 < n < len(pairs):
        keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
        pairs = [pairs[i] for i in keep]
    return pairs
