"""Rows of user data from local files or ``datasets``: JSONL, JSON, CSV, parquet, a folder saved with
``save_to_disk``, or a data set name in the local Hugging Face cache.

TRL's data formats hold either strings (standard) or lists of ``{"role", "content"}`` messages
(conversational); :func:`message_text` renders the latter with the tokenizer's chat template when it has one.
Errors are one-line RftlabErrors that say what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rftlab.errors import RftlabError

__all__ = ["is_conversation", "prompt_and_completions", "read_records", "require_columns"]

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_records(source: str | Path, what: str, split: str = "train") -> list[dict[str, Any]]:
    """The rows of ``source`` as dicts. ``what`` names the data in error messages ("prompts", "preference pairs").

    ``source``: a .jsonl/.json/.csv/.parquet file, a ``save_to_disk`` folder (a DatasetDict gives ``split``, else
    its first split), or a ``datasets`` hub name already in the local cache (read offline).
    """
    path = Path(source).expanduser()
    looks_like_name = not path.exists() and not str(source).startswith(("/", ".", "~")) and \
        path.suffix.lower() not in SUFFIXES and str(source).count("/") <= 1
    if not path.exists() and not looks_like_name:
        raise RftlabError(f"{what} file {source} does not exist: pass a .jsonl/.csv/.parquet file, a datasets "
                          "folder saved with save_to_disk(), or a data set name in the local Hugging Face cache.")
    try:
        rows = _hub_rows(str(source), split) if looks_like_name else _read(path, split)
    except RftlabError:
        raise
    except Exception as err:  # parser errors of pandas / datasets / json, whatever their type
        raise RftlabError(f"cannot read {what} from {source}: {' '.join(str(err).split())[:200]}") from None
    if not rows:
        raise RftlabError(f"{source} holds no {what}.")
    return rows


def require_columns(rows: list[dict], columns: tuple[str, ...], source: str | Path, what: str) -> None:
    """Raise a one-line error naming the missing columns and the ones the data has."""
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise RftlabError(f"{source} lacks column(s) {', '.join(missing)}; found {', '.join(map(str, rows[0]))}. "
                          f"{what[0].upper() + what[1:]} need {', '.join(columns)}.")


def is_conversation(value: Any) -> bool:
    """A list of chat messages ``[{"role": ..., "content": ...}, ...]`` (TRL's conversational format)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)


def _read(path: Path, split: str) -> list[dict]:
    suffix = path.suffix.lower()
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict
            data = data[split] if split in data else data[next(iter(data.keys()))]
        return data.to_list()
    import pandas as pd

    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl").to_dict("records")
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False).to_dict("records")
    if suffix == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    raise RftlabError(f"cannot read {path}: use .jsonl, .json, .csv, .parquet or a datasets folder saved with "
                      "save_to_disk().")


def _hub_rows(name: str, split: str) -> list[dict]:
    import os

    from datasets import load_dataset

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a cache lookup, never a download that hangs
    try:
        data = load_dataset(name, split=split)
    except Exception as err:
        raise RftlabError(f"data set {name!r} is neither a local file nor in the Hugging Face cache "
                          f"({' '.join(str(err).split())[:120]}); on a machine with network run "
                          f"`python -c \"import datasets; datasets.load_dataset('{name}')\"` and copy the cache, or "
                          "pass a local file.") from None
    return data.to_list()


def prompt_and_completions(prompt: Any, completions: list[Any], tokenizer=None) -> tuple[str, list[str]]:
    """Strings for one row of TRL data: the prompt and its completions (one, or chosen and rejected).

    Standard rows are strings and pass through. Conversational rows (message lists) are rendered with the
    tokenizer's chat template when it has one, as TRL does: the prompt with the generation prompt appended,
    each completion as the text the template adds after it; without a template, message contents are joined
    with newlines. Raises ValueError (with what was found) for any other value.
    """
    if isinstance(prompt, str) and all(isinstance(c, str) for c in completions):
        return prompt, list(completions)
    if not (is_conversation(prompt) or isinstance(prompt, str)) or not all(
            is_conversation(c) or isinstance(c, str) for c in completions):
        kinds = ", ".join(type(v).__name__ for v in [prompt, *completions])
        raise ValueError(f"expected strings or lists of chat messages, got {kinds}")
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template is None or not is_conversation(prompt):
        def join(value: Any) -> str:
            return value if isinstance(value, str) else "\n".join(str(m["content"]) for m in value)

        return join(prompt), [join(c) for c in completions]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    rendered = []
    for completion in completions:
        messages = completion if is_conversation(completion) else [{"role": "assistant", "content": completion}]
        full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
        # the template may re-render the prompt differently once a reply follows; then fall back to the contents
        rendered.append(full[len(head):] if full.startswith(head) else "\n".join(str(m["content"]) for m in messages))
    return head, rendered
