"""``rftlab diagnose``: both papers' diagnostics on a user's own model and data.

- :mod:`rftlab.diagnose.rewards`: per-prompt reward mean/std under the model and sampled expected-gradient
  norms (Razin et al.: prompts whose reward std is small barely move under RL finetuning);
- :mod:`rftlab.diagnose.pairs`: per-pair gradient norms, inner products and the regime the loss predicts (Yuan et
  al.: pairs whose chosen log-prob a DPO-like loss will push down);
- :mod:`rftlab.diagnose.inputs`: loading the model, the prompts or pairs and the reward.

Each diagnosis module has the shape of an experiment module (``Config``, ``check``, ``check_processes``,
``run``, ``plot``, ``METRICS``) and writes a run folder like ``rftlab run``, on one process or several
(``--num-processes N``, ``accelerate launch``, ``torchrun``: the prompts or pairs are split between the
processes and the results gathered, equal to a one-process run's; see :mod:`rftlab.launch`).
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
            progress_factory=None, processes: int = 1):
    """Run ``diagnose <kind>`` with a resolved ``cfg``: check its inputs, make the run folder under
    ``<out_root>/diagnose-<kind>/``, run, render the figures. Returns the run folder (its ``summary.md`` holds the
    findings) on the main process, None on the others. A failure marks the folder ``failed`` and re-raises.

    ``processes`` > 1 outside a launched run: make the folder, start that many workers running this command on it
    (:func:`rftlab.launch.spawn`) and raise :class:`SystemExit` with their exit status."""
    from rftlab import distributed, launch

    s = spec(kind)
    s.check(cfg)
    handle = launch.open_run(s, cfg, lambda: s.new_run(cfg, preset=kind, out_root=out_root, device=device,
                                                       argv=list(argv)), processes=processes, device=device)
    if launch.is_launcher(processes):  # the workers re-run this command on the folder just made
        raise SystemExit(launch.spawn(handle, processes))
    handle.device = distributed.device(device)
    handle.progress_factory = progress_factory
    handle.info(f"{s.name}: run folder {handle.path}")
    try:
        s.run(cfg, handle)
    except BaseException as exc:
        handle.finish("failed")
        launch.on_worker_failure(exc)
        raise
    handle.finish("complete")
    if not handle.is_main:
        return None
    for fig in s.plot([handle.path], handle.path / "figures", fmt):
        handle.info(f"figure: {fig}")
    return handle.path
