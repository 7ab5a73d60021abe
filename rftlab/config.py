"""Experiment configuration: frozen dataclasses as the schema, TOML presets, ``key=value`` overrides.

Resolution order (later wins): the dataclass defaults, the preset file
``experiments/<name>/<preset>.toml``, a user's ``--config file.toml``, then each ``--set key=value``.
Values are coerced to the field's annotated type; an unknown key or a bad value raises
:class:`~rftlab.errors.RftlabError` naming the key, the expected type and close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from rftlab.errors import RftlabError


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (annotations may be strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def dotted_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf field as ``{"a.b.c": type}``, descending into nested dataclasses."""
    out: dict[str, Any] = {}
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(dotted_fields(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def type_name(tp: Any) -> str:
    """A readable name for an annotation: ``int``, ``list[float]``, ``one of 'mlp', 'cnn'``."""
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce_error(value: Any, tp: Any, key: str) -> RftlabError:
    return RftlabError(f"bad value {value!r} for {key}: expected {type_name(tp)}.")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML-parsed value to annotation ``tp`` or raise an error that names ``key``."""

    def bad() -> RftlabError:
        return _coerce_error(value, tp, key)

    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value not in args:
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except RftlabError:
                continue
        raise bad()
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]  # `--set seeds=3` means (3,)
        item_tp = args[0] if args else Any
        try:
            return tuple(_coerce(v, item_tp, key) for v in items)
        except RftlabError:
            raise bad() from None  # name the whole value and the field's type, not one item's
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise bad()


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` as a TOML value; bare words stay strings, also inside a
    list (``names=[iwslt,totto]`` is ``["iwslt", "totto"]``, since shells strip the quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.startswith("[") and text.endswith("]"):
            return [parse_value(item.strip()) for item in text[1:-1].split(",") if item.strip()]
        return text


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unknown_key(key: str, known: dict[str, Any], source: str) -> RftlabError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return RftlabError(
        f"unknown config key {key!r} in {source}.{hint} `rftlab list <experiment>` shows every key."
    )


def _build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    kwargs = {}
    for name, tp in field_types(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, flat, f"{key}.")
        elif key in flat:
            kwargs[name] = flat[key]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # raised by a Config's __post_init__ checks
        raise RftlabError(f"invalid config: {exc}") from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RftlabError(f"config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise RftlabError(f"config file {path} is not valid TOML: {exc}.") from None


def _coerce_default(value: Any, tp: Any, key: str) -> Any:
    """A dataclass default, coerced where rftlab knows the type (others are kept as written)."""
    try:
        return _coerce(value, tp, key)
    except RftlabError:
        return value


def resolve(
    cls: type,
    layers: list[tuple[str, dict[str, Any]]],
    overrides: list[str] = (),
) -> Any:
    """Build a ``cls`` instance from defaults, TOML layers ``(source, table)`` and ``key=value`` words."""
    known = dotted_fields(cls)
    # Defaults go through the same coercion as everything else: to_dict turned tuples into lists.
    values: dict[str, Any] = {
        k: _coerce_default(v, known[k], k) for k, v in _flatten(to_dict(cls())).items() if k in known
    }
    for source, table in layers:
        for key, raw in _flatten(table).items():
            if key not in known:
                raise _unknown_key(key, known, source)
            values[key] = _coerce(raw, known[key], key)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RftlabError(f"override {item!r} is not of the form key=value (e.g. lr=1e-3).")
        if key not in known:
            raise _unknown_key(key, known, "--set")
        parsed = parse_value(text.strip())
        try:
            values[key] = _coerce(parsed, known[key], key)
        except RftlabError:
            if isinstance(parsed, str):
                raise
            try:  # `name=2024` for a str field (or a Literal of strings): the word itself is the value
                values[key] = _coerce(text.strip(), known[key], key)
            except RftlabError:
                raise _coerce_error(parsed, known[key], key) from None
    return _build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python dict of a config (tuples become lists), for JSON and TOML."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_hash(cfg: Any) -> str:
    """Short content hash of a config (or a tuple of configs and values), for run ids and cache keys."""
    parts = cfg if isinstance(cfg, tuple) else (cfg,)
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain if isinstance(cfg, tuple) else plain[0], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in a Config's source, by field name."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for m in map(pattern.match, source.splitlines()) if m}
