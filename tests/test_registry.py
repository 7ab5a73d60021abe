"""Experiment registry: discovery by import, lookup with suggestions, presets, the light-import rule."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from rftlab import config, registry
from rftlab.errors import RftlabError


def test_discover_finds_theorem_bound() -> None:
    found = registry.discover()
    assert "theorem-bound" in found
    assert list(found) == sorted(found)
    spec = found["theorem-bound"]
    assert spec.name == "theorem-bound"
    assert spec.paper == "Razin et al. 2024"
    assert spec.version == 1
    assert spec.module.__name__ == "rftlab.experiments.theorem_bound"
    assert spec.config_cls is spec.module.Config
    assert spec.run is spec.module.run and spec.plot is spec.module.plot
    assert {"max_bound_ratio", "n_points", "inputs.parquet"} <= set(spec.metrics)
    assert spec.summary.startswith("Theorem 1 of Razin et al. (ICLR 2024)")


def test_get_exact_and_near_miss() -> None:
    assert registry.get("theorem-bound").name == "theorem-bound"
    with pytest.raises(RftlabError) as info:
        registry.get("theorem-bond")
    assert "unknown experiment 'theorem-bond'. Did you mean 'theorem-bound'?" in str(info.value)
    with pytest.raises(RftlabError, match="Did you mean 'theorem-bound'"):
        registry.get("theorem_bound")
    with pytest.raises(RftlabError) as info:
        registry.get("qqqqqq")
    assert "Did you mean" not in str(info.value) and "rftlab list" in str(info.value)


def test_presets() -> None:
    names = registry.presets("theorem-bound")
    assert {"default", "smoke"} <= set(names)
    assert names[:2] == ["default", "smoke"]  # default first, then smoke, paper, the rest
    assert registry.presets("no-such-experiment") == []
    assert (registry.presets_dir() / "theorem-bound" / "smoke.toml").is_file()


def test_registering_a_name_twice_from_another_module_fails() -> None:
    decorate = registry.experiment(name="theorem-bound", paper="x", figure="y", version=1, cpu_runtime="0 s")

    @dataclass(frozen=True)
    class Impostor:  # defined in this test module, not in theorem_bound
        pass

    with pytest.raises(RuntimeError, match="registered twice"):
        decorate(Impostor)
    assert registry.get("theorem-bound").module.__name__ == "rftlab.experiments.theorem_bound"


@pytest.mark.parametrize("name", sorted(registry.discover()))
def test_every_experiment_meets_the_contract(name: str) -> None:
    """Config, run, plot, METRICS, and presets that resolve without error (smoke for tests)."""
    spec = registry.get(name)
    assert callable(spec.run) and callable(spec.plot) and spec.metrics
    assert "smoke" in registry.presets(name) and "default" in registry.presets(name)
    for preset in registry.presets(name):
        path = registry.presets_dir() / name / f"{preset}.toml"
        cfg = config.resolve(spec.config_cls, [(str(path), config.read_toml(path))])
        assert isinstance(cfg, spec.config_cls)
        assert len(config.config_hash(cfg)) == 8


def test_discovery_imports_no_heavy_library() -> None:
    """`rftlab list` and `--help` stay fast only if experiment modules keep their top level light."""
    code = (
        "import sys; from rftlab import registry, cli; registry.discover(); "
        "print(sorted(m for m in ('torch', 'pandas', 'matplotlib', 'numpy', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
