"""Experiment registry: the ``@experiment`` decorator, discovery by import, lookup with suggestions.

Every module in :mod:`rftlab.experiments` registers itself when imported. Experiment modules keep
their top level light (dataclasses, the decorator, plain Python) and import torch and matplotlib
inside ``run`` and ``plot``, so discovery, ``rftlab list`` and ``rftlab --help`` stay fast.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from rftlab.errors import RftlabError


@dataclass(frozen=True)
class ExperimentSpec:
    """What the CLI needs to know about one experiment module."""

    name: str  # command-line name, e.g. "theorem-bound"
    paper: str  # short citation, e.g. "Razin et al. 2024"
    figure: str  # the paper item it reproduces, e.g. "Thm 1", "Fig. 3"
    version: int  # bumped when results change meaning; plots refuse to mix versions
    cpu_runtime: str  # wall time of the default preset on a 2-core CPU, e.g. "~10 s"
    module: ModuleType  # defines Config, run(cfg, run), plot(run_dirs, out_dir), METRICS; optional check(cfg)

    @property
    def config_cls(self) -> type:
        return self.module.Config

    @property
    def run(self) -> Callable:
        return self.module.run

    @property
    def plot(self) -> Callable:
        return self.module.plot

    @property
    def metrics(self) -> dict[str, str]:
        return getattr(self.module, "METRICS", {})

    @property
    def summary(self) -> str:
        """First paragraph of the module docstring."""
        doc = inspect.getdoc(self.module) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    def check(self, cfg) -> None:
        """The module's optional ``check(cfg)``: cheap checks of its inputs (data files, model folders) that
        raise RftlabError before a run folder is made, so bad input leaves nothing behind."""
        check = getattr(self.module, "check", None)
        if check is not None:
            check(cfg)

    def new_run(self, cfg, *, preset: str, out_root: Path, device: str = "cpu", argv: list[str] = ()):
        """A fresh run folder of this experiment under ``out_root`` (see :func:`rftlab.results.create_run`)."""
        from rftlab import results

        return results.create_run(experiment=self.name, version=self.version, preset=preset, cfg=cfg,
                                  out_root=out_root, device=device, argv=list(argv))


_REGISTRY: dict[str, ExperimentSpec] = {}


def experiment(*, name: str, paper: str, figure: str, version: int, cpu_runtime: str) -> Callable:
    """Register the module that defines the decorated ``Config`` dataclass as an experiment.

    Usage, at the end of the Config definition in ``rftlab/experiments/<module>.py``::

        @experiment(name="theorem-bound", paper="Razin et al. 2024", figure="Thm 1",
                    version=1, cpu_runtime="~5 s")
        @dataclass(frozen=True)
        class Config: ...
    """

    def decorate(config_cls: type) -> type:
        module = inspect.getmodule(config_cls)
        if name in _REGISTRY and _REGISTRY[name].module is not module:
            raise RuntimeError(f"experiment name {name!r} registered twice")
        _REGISTRY[name] = ExperimentSpec(name, paper, figure, version, cpu_runtime, module)
        return config_cls

    return decorate


def discover() -> dict[str, ExperimentSpec]:
    """Import every module under :mod:`rftlab.experiments` and return the registry by name."""
    import rftlab.experiments as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> ExperimentSpec:
    """Look an experiment up by name; an unknown name raises with the closest matches."""
    registry = discover()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise RftlabError(f"unknown experiment {name!r}.{hint} Run `rftlab list` to see all experiments.")


def presets_dir() -> Path:
    """Folder holding ``<experiment>/<preset>.toml``: the package's copy, else the source tree's."""
    packaged = Path(__file__).parent / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "experiments"


def presets(name: str) -> list[str]:
    """Preset names available for an experiment (``smoke``, ``default``, ``paper``, ...)."""
    folder = presets_dir() / name
    order = {"default": 0, "smoke": 1, "paper": 2}
    found = [p.stem for p in folder.glob("*.toml")] if folder.is_dir() else []
    return sorted(found, key=lambda s: (order.get(s, 3), s))


def preset_config(spec: ExperimentSpec, preset: str | None = "default", overrides: list[str] = (),
                  config_file: Path | None = None):
    """The experiment's Config from its preset file, a user's TOML file and ``key=value`` overrides, in that
    order; an unknown preset raises with the list of presets that exist."""
    from rftlab import config

    layers = []
    if preset:
        preset_path = presets_dir() / spec.name / f"{preset}.toml"
        if not preset_path.exists():
            known = ", ".join(presets(spec.name)) or "none"
            raise RftlabError(f"experiment {spec.name!r} has no preset {preset!r} (presets: {known}).")
        layers.append((str(preset_path), config.read_toml(preset_path)))
    if config_file is not None:
        layers.append((str(config_file), config.read_toml(config_file)))
    return config.resolve(spec.config_cls, layers, list(overrides))
