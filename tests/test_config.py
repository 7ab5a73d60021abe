"""Config resolution: coercion of key=value words, TOML layers, error messages, config hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from rftlab import config
from rftlab.errors import RftlabError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3  # Adam learning rate
    betas: tuple[float, ...] = (0.9, 0.999)  # Adam (β1, β2)


@dataclass(frozen=True)
class Toy:
    steps: int = 10  # optimizer steps
    lr: float = 0.1  # learning rate η
    use_bias: bool = False  # add a bias term
    seeds: tuple[int, ...] = (0,)  # one run per seed
    arch: Literal["mlp", "cnn"] = "mlp"  # network family
    name: str = "toy"  # free-form label
    width: int | None = None  # hidden width; None = automatic
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be ≥ 0")


def resolve(*words: str, layers: list | None = None) -> Toy:
    return config.resolve(Toy, layers or [], list(words))


def error_of(*words: str, layers: list | None = None) -> str:
    with pytest.raises(RftlabError) as info:
        resolve(*words, layers=layers)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


# --- coercion ------------------------------------------------------------------------------------


def test_defaults_resolve_to_the_dataclass_defaults() -> None:
    cfg = resolve()
    assert cfg == Toy()
    assert cfg.seeds == (0,) and isinstance(cfg.seeds, tuple)  # not the list that to_dict produces
    assert isinstance(cfg.optim.betas, tuple)
    hash(cfg)  # frozen configs stay hashable


def test_int_float_bool_coercion() -> None:
    cfg = resolve("steps=3", "lr=1e-3", "use_bias=true")
    assert cfg.steps == 3 and type(cfg.steps) is int
    assert cfg.lr == 0.001 and type(cfg.lr) is float
    assert cfg.use_bias is True
    assert resolve("lr=2").lr == 2.0 and type(resolve("lr=2").lr) is float
    assert resolve("steps=4.0").steps == 4  # an integral float is an int
    assert resolve("use_bias=false", layers=[("a.toml", {"use_bias": True})]).use_bias is False


def test_tuple_coercion_from_list_and_from_single_value() -> None:
    assert resolve("seeds=[1,2]").seeds == (1, 2)
    assert resolve("seeds=[1, 2, 3]").seeds == (1, 2, 3)
    assert resolve("seeds=3").seeds == (3,)  # `seeds=3` means one seed
    assert resolve("optim.betas=[0.5,1]").optim.betas == (0.5, 1.0)
    assert all(type(b) is float for b in resolve("optim.betas=[0.5,1]").optim.betas)


def test_literal_choices() -> None:
    assert resolve("arch=cnn").arch == "cnn"
    assert resolve('arch="cnn"').arch == "cnn"
    message = error_of("arch=rnn")
    assert message == "bad value 'rnn' for arch: expected one of 'mlp', 'cnn'."


def test_str_and_optional_fields() -> None:
    assert resolve("name=run-a").name == "run-a"
    assert resolve("name=2024").name == "2024"  # digits are still a name for a str field
    assert resolve("width=64").width == 64
    assert resolve().width is None


def test_nested_dotted_keys_in_words_and_toml_tables() -> None:
    cfg = resolve("optim.lr=0.5")
    assert cfg.optim == Optim(lr=0.5)
    cfg = resolve(layers=[("file.toml", {"optim": {"lr": 0.25, "betas": [0.1, 0.2]}})])
    assert cfg.optim == Optim(lr=0.25, betas=(0.1, 0.2))
    assert cfg.steps == 10


def test_parse_value() -> None:
    assert config.parse_value("3") == 3
    assert config.parse_value("1e-3") == 0.001
    assert config.parse_value("[1,2]") == [1, 2]
    assert config.parse_value("true") is True
    assert config.parse_value("hello") == "hello"  # bare words stay strings


# --- errors --------------------------------------------------------------------------------------


def test_unknown_key_suggests_close_matches() -> None:
    message = error_of("stesp=3")
    assert message.startswith("unknown config key 'stesp' in --set. Did you mean steps")
    assert "optim.lr" in error_of("optim.lrr=1")
    assert "Did you mean" not in error_of("zzzz=1")


def test_unknown_key_in_a_toml_layer_names_the_file() -> None:
    message = error_of(layers=[("my.toml", {"optim": {"betaz": [1.0]}})])
    assert "'optim.betaz' in my.toml" in message and "optim.betas" in message


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("steps=abc", "bad value 'abc' for steps: expected int."),
        ("steps=1.5", "bad value 1.5 for steps: expected int."),
        ("lr=fast", "bad value 'fast' for lr: expected float."),
        ("use_bias=1", "bad value 1 for use_bias: expected bool."),
        ("seeds=[1,'a']", "bad value [1, 'a'] for seeds: expected tuple[int, ...]."),
        ("width=wide", "bad value 'wide' for width: expected int | None."),
        ("optim.betas=x", "bad value 'x' for optim.betas: expected tuple[float, ...]."),
    ],
)
def test_wrong_type_names_key_and_expected_type(word: str, expected: str) -> None:
    assert error_of(word) == expected


def test_wrong_type_in_a_toml_layer() -> None:
    assert error_of(layers=[("p.toml", {"steps": "five"})]) == "bad value 'five' for steps: expected int."


def test_malformed_word() -> None:
    for word in ("steps", "=3"):
        assert error_of(word) == f"override {word!r} is not of the form key=value (e.g. lr=1e-3)."


def test_post_init_value_error_becomes_rftlab_error() -> None:
    assert error_of("steps=-1") == "invalid config: steps must be ≥ 0"


def test_read_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(RftlabError, match=r"config file .*nope\.toml does not exist\."):
        config.read_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(RftlabError, match=r"bad\.toml is not valid TOML"):
        config.read_toml(bad)


# --- layers --------------------------------------------------------------------------------------


def test_layer_order_preset_then_config_file_then_words(tmp_path: Path) -> None:
    preset = tmp_path / "preset.toml"
    preset.write_text("steps = 5\nlr = 0.2\nname = 'preset'\n[optim]\nlr = 0.5\n")
    user = tmp_path / "user.toml"
    user.write_text("lr = 0.3\nname = 'user'\n[optim]\nlr = 0.01\n")
    layers = [(str(preset), config.read_toml(preset)), (str(user), config.read_toml(user))]
    cfg = config.resolve(Toy, layers, ["optim.lr=0.02", "name=cli"])
    assert cfg == Toy(steps=5, lr=0.3, name="cli", optim=Optim(lr=0.02))
    # a later word for the same key wins too
    assert config.resolve(Toy, layers, ["steps=1", "steps=2"]).steps == 2


# --- hashes and introspection --------------------------------------------------------------------


def test_config_hash_is_stable_and_sensitive() -> None:
    base = config.config_hash(resolve())
    blob = json.dumps(config.to_dict(Toy()), sort_keys=True).encode()
    assert base == hashlib.sha256(blob).hexdigest()[:8] == config.config_hash(Toy())
    assert len(base) == 8
    assert config.config_hash(resolve("steps=10")) == base  # same values, same hash
    assert config.config_hash(resolve("lr=0.2", "steps=3")) == config.config_hash(resolve("steps=3", "lr=0.2"))
    changed = {config.config_hash(resolve(w)) for w in ("steps=11", "lr=0.11", "optim.lr=0.002", "seeds=[0,1]")}
    assert base not in changed and len(changed) == 4


def test_to_dict_is_plain_json() -> None:
    assert config.to_dict(Toy()) == {
        "steps": 10, "lr": 0.1, "use_bias": False, "seeds": [0], "arch": "mlp", "name": "toy",
        "width": None, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]},
    }


def test_introspection_for_rftlab_list() -> None:
    assert config.dotted_fields(Toy)["optim.lr"] is float
    assert list(config.dotted_fields(Toy)) == [
        "steps", "lr", "use_bias", "seeds", "arch", "name", "width", "optim.lr", "optim.betas"]
    assert config.type_name(tuple[int, ...]) == "tuple[int, ...]"
    assert config.type_name(Literal["mlp", "cnn"]) == "one of 'mlp', 'cnn'"
    assert config.type_name(int | None) == "int | None"
    assert config.type_name(float) == "float"
    comments = config.field_comments(Toy)
    assert comments["lr"] == "learning rate η"
    assert comments["width"] == "hidden width; None = automatic"
    assert "optim" not in comments


@dataclass(frozen=True)
class WithOpaqueField:
    table: dict = field(default_factory=lambda: {"a": 1})  # a type overrides cannot set
    steps: int = 1  # steps


def test_fields_of_other_types_keep_their_defaults() -> None:
    cfg = config.resolve(WithOpaqueField, [], ["steps=2"])
    assert cfg == WithOpaqueField(steps=2)
