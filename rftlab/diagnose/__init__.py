"""``rftlab diagnose``: both papers' diagnostics on a user's own model and data.

- :mod:`rftlab.diagnose.rewards`: per-prompt reward mean/std under the model and sampled expected-gradient
  norms (Razin et al.: prompts whose reward std is small barely move under RL finetuning);
- :mod:`rftlab.diagnose.pairs`: per-pair gradient norms, inner products and the regime the loss predicts (Yuan et
  al.: pairs whose chosen log-prob a DPO-like loss will push down);
- :mod:`rftlab.diagnose.inputs`: loading the model, the prompts or pairs and the reward.

Each diagnosis module has the shape of an experiment module (``Config``, ``check``, ``run``, ``plot``,
``METRICS``) and writes a run folder like ``rftlab run``; :data:`DIAGNOSES` holds their specs.
"""

from __future__ import annotations

import importlib

from rftlab.registry import ExperimentSpec

KINDS = {"rewards": "Razin et al. 2024, Fig. 1 on your data", "pairs": "Yuan et al. 2024, §3 on your data"}


def spec(kind: str) -> ExperimentSpec:
    """The spec of ``diagnose <kind>``; its runs live under ``<results>/diagnose-<kind>/``."""
    module = importlib.import_module(f"rftlab.diagnose.{kind}")
    return ExperimentSpec(f"diagnose-{kind}", KINDS[kind], f"diagnose {kind}", module.VERSION, "", module)


def execute(kind: str, cfg, *, out_root, device: str = "cpu", argv: list[str] = (), fmt: str = "png",
            progress_factory=None):
    """Run ``diagnose <kind>`` with a resolved ``cfg``: check its inputs, make the run folder under
    ``<out_root>/diagnose-<kind>/``, run, render the figures. Returns the run folder (its ``summary.md`` holds the
    findings). A failure marks the folder ``failed`` and re-raises."""
    s = spec(kind)
    s.check(cfg)
    handle = s.new_run(cfg, preset=kind, out_root=out_root, device=device, argv=list(argv))
    handle.device = device
    handle.progress_factory = progress_factory
    handle.info(f"{s.name}: run folder {handle.path}")
    try:
        s.run(cfg, handle)
    except BaseException:
        handle.finish("failed")
        raise
    handle.finish("complete")
    for fig in s.plot([handle.path], handle.path / "figures", fmt):
        handle.info(f"figure: {fig}")
    return handle.path
