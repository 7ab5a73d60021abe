"""Loading what a diagnosis runs on: a Hugging Face model (causal or seq2seq, optionally with a PEFT adapter),
prompts, and a reward.

Every failure is a one-line RftlabError saying what to fix: a model that cannot be loaded offline, a file that
cannot be read, a missing column, a reward that cannot be imported, raises, or returns the wrong number of
values.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rftlab.data.records import prompt_and_completions, read_records, require_columns
from rftlab.errors import RftlabError

# reference columns a registry reward (BLEU, ROUGE, ...) may score against, first match wins
REFERENCE_COLUMNS = ("references", "reference", "completion", "answer", "target")


@dataclass
class PromptRow:
    """One prompt (rendered to a string), its references if the data has any, and the row's other columns."""

    prompt: str
    references: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def check_path(what: str, value: str, folder: bool = False) -> None:
    """Before any loading: a path (not a hub name) must exist. Hub names start with a letter, hold at most one
    '/' and no file suffix; anything else is a path the user meant to exist."""
    path = Path(value).expanduser()
    if path.exists() or not (value.startswith(("/", ".", "~")) or value.count("/") > 1 or path.suffix):
        return
    hint = "a folder saved with save_pretrained()" if folder else "a .jsonl/.csv/.parquet file or a datasets folder"
    raise RftlabError(f"{what} {value!r} does not exist: pass {hint}.")


def adapter_base(name_or_path: str) -> str | None:
    """The base model named by a PEFT adapter folder's ``adapter_config.json``, or None if it is not one."""
    config = Path(name_or_path).expanduser() / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise RftlabError(f"{config} names no base_model_name_or_path: pass the base model with --model and "
                          "the adapter folder with --adapter.")
    return base


def load_model(name_or_path: str, adapter: str = "", *, device: str = "cpu", allow_download: bool = False):
    """(model, tokenizer) from a hub name (local cache) or a ``save_pretrained`` folder.

    The architecture comes from the model's config: encoder-decoder models load as seq2seq LMs, all others as
    causal LMs. A PEFT adapter is applied from ``adapter`` (a folder), or when ``name_or_path`` itself is an
    adapter folder (its ``adapter_config.json`` names the base). Adapter weights are loaded trainable, so
    gradient diagnostics live in the adapter's parameters, the ones finetuning moves. The tokenizer is the
    adapter folder's when it has one, else the base model's (without a pad token, EOS pads).
    """
    from transformers import AutoConfig

    from rftlab import models, tokenization
    from rftlab.lm_config import LMConfig

    if not adapter and adapter_base(name_or_path):
        adapter, name_or_path = name_or_path, adapter_base(name_or_path)
    local = Path(name_or_path).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(local) if local.is_dir() else name_or_path,
                                            local_files_only=not allow_download and not local.is_dir())
    except (OSError, ValueError) as err:
        raise RftlabError(tokenization.missing_message("model", name_or_path, err)) from None
    arch = "t5" if config.is_encoder_decoder else "gpt2"  # build_model's two loaders: seq2seq vs causal
    tokenizer_source = adapter if adapter and _has_tokenizer(adapter) else name_or_path
    tokenizer = tokenization.load_tokenizer(tokenizer_source, allow_download=allow_download)
    model = models.build_model(LMConfig(arch=arch, name_or_path=name_or_path, allow_download=allow_download),
                               tokenizer)
    if adapter:
        if not Path(adapter).expanduser().is_dir():
            raise RftlabError(f"adapter {adapter!r} is not a folder: pass a folder saved by a peft model's "
                              "save_pretrained().")
        try:
            from peft import PeftModel
        except ImportError:
            raise RftlabError("loading an adapter needs peft: pip install peft.") from None
        try:
            model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()), is_trainable=True)
        except Exception as err:  # peft raises ValueError/KeyError/RuntimeError for mismatched adapters
            raise RftlabError(f"cannot apply adapter {adapter!r} to {name_or_path!r}: "
                              f"{' '.join(str(err).split())[:200]}") from None
    return model.to(device), tokenizer


def _has_tokenizer(folder: str) -> bool:
    path = Path(folder).expanduser()
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def load_prompts(source: str, column: str = "prompt", tokenizer=None, limit: int = 0) -> list[PromptRow]:
    """The first ``limit`` prompts (0 = all) of a file or data set (:func:`rftlab.data.records.read_records`).

    ``column`` holds strings or TRL conversational prompts (message lists, rendered with the tokenizer's chat
    template when it has one). References for registry rewards come from the first of REFERENCE_COLUMNS the data
    has (a string or a list of strings); every other column is kept in ``extra`` and passed to user rewards that
    accept it, as TRL passes data set columns to reward functions.
    """
    rows = read_records(source, "prompts")
    require_columns(rows, (column,), source, "prompts")
    rows = rows[:limit] if limit > 0 else rows
    ref_column = next((c for c in REFERENCE_COLUMNS if c in rows[0]), None)
    out = []
    for i, row in enumerate(rows):
        try:
            prompt, _ = prompt_and_completions(row[column], [], tokenizer)
        except ValueError as err:
            raise RftlabError(f"{source}, row {i}, column {column!r}: {err}.") from None
        if not prompt.strip():  # nothing for the model to continue (and no token to start sampling from)
            raise RftlabError(f"{source}, row {i}, column {column!r}: the prompt is empty; remove the row or give "
                              "it text.")
        refs = row.get(ref_column) if ref_column else None
        refs = [] if refs is None else [refs] if isinstance(refs, str) else [str(r) for r in refs]
        out.append(PromptRow(prompt, refs, {k: v for k, v in row.items() if k not in (column, ref_column)}))
    return out


Score = Callable[[list[int], list[str]], list[float]]


def load_reward(name: str, rows: list[PromptRow]) -> Score:
    """``score(prompt_index, completions) -> rewards`` for a registry reward or a user's ``module:function``.

    Registry rewards (``rftlab.rewards``) take references: the rows must have a reference column. A user
    function is called as TRL calls reward functions, with keywords: ``prompts`` and ``completions`` (lists of
    strings), plus every other data column it names or all of them if it takes ``**kwargs``. It must return
    one finite float per completion; anything else raises a one-line error naming the function.
    """
    from rftlab import rewards

    fn = rewards.get_reward(name)
    if name in rewards.REWARDS:
        if not any(r.references for r in rows) and name != "vader_sentiment":
            raise RftlabError(f"reward {name!r} scores against references, but the prompts have no "
                              f"{'/'.join(REFERENCE_COLUMNS)} column; add one or pass a 'module:function' reward.")

        def call(index: list[int], completions: list[str]) -> Any:
            return fn(completions, [rows[i].references for i in index], [rows[i].prompt for i in index])
    else:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        columns = sorted({k for r in rows for k in r.extra if takes_all or k in params})

        def call(index: list[int], completions: list[str]) -> Any:
            extra = {c: [rows[i].extra.get(c) for i in index] for c in columns}
            return fn(prompts=[rows[i].prompt for i in index], completions=completions, **extra)

    def score(index: list[int], completions: list[str]) -> list[float]:
        try:
            values = call(index, completions)
        except RftlabError:
            raise
        except Exception as err:
            raise RftlabError(f"reward {name!r} raised {type(err).__name__}: {' '.join(str(err).split())[:160]}"
                              ) from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RftlabError(f"reward {name!r} must return a list of floats, one per completion; got "
                              f"{type(values).__name__}.") from None
        if len(values) != len(completions):
            raise RftlabError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions; "
                              "it must return one float per completion.")
        if not all(math.isfinite(v) for v in values):
            raise RftlabError(f"reward {name!r} returned a NaN or infinite value.")
        return values

    return score
