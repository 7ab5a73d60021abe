"""Shared helpers for the core tests: the ``rftlab`` command as a subprocess, one smoke run per session.

Nothing heavy is imported here (no torch, pandas or matplotlib): test modules import what they use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def rftlab_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m rftlab.cli``."""
    script = Path(sys.executable).parent / "rftlab"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rftlab.cli"]


def cli_env() -> dict[str, str]:
    """Environment for subprocess runs: wide, colourless rich output (so table cells are not wrapped)."""
    env = dict(os.environ)
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    env.pop("FORCE_COLOR", None)
    return env


def run_rftlab(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``rftlab <args>`` to completion and return its CompletedProcess (text stdout/stderr)."""
    return subprocess.run(
        [*rftlab_command(), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=cli_env(),
        timeout=timeout,
    )


@pytest.fixture()
def rftlab() -> Callable[..., subprocess.CompletedProcess]:
    """``rftlab(*args, cwd=None)``: run the command in a subprocess, return the CompletedProcess."""
    return run_rftlab


@pytest.fixture()
def rftlab_argv() -> list[str]:
    """The command line that starts ``rftlab`` (for Popen and timing)."""
    return rftlab_command()


@pytest.fixture()
def rftlab_env() -> dict[str, str]:
    return cli_env()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``rftlab run theorem-bound --preset smoke`` in a subprocess; its run folder, shared read-only.

    Tests that modify a run folder copy it first (``copy_of_smoke_run``).
    """
    out = tmp_path_factory.mktemp("smoke-results")
    proc = run_rftlab("run", "theorem-bound", "--preset", "smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    folder = Path(lines[-1])
    assert folder.is_dir(), proc.stdout
    return folder


@pytest.fixture()
def copy_of_smoke_run(smoke_run: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke run folder, under ``tmp_path/theorem-bound/<run-id>``."""
    import shutil

    target = tmp_path / "theorem-bound" / smoke_run.name
    shutil.copytree(smoke_run, target)
    return target


def run_killed_then_resumed(spec, cfg, out_root: Path, kill_after: int,
                            after_kill: Callable[[Path], None] | None = None) -> Path:
    """Run an experiment as a kill between two of its units would leave it, then ``--resume`` it to the end.

    The run handle's ``save_checkpoint`` raises KeyboardInterrupt right after its ``kill_after``-th checkpoint
    is saved (a SIGKILL there loses nothing more); the folder is marked failed, ``after_kill(folder)`` may look
    at what was left, and the run is reopened and finished. Returns the run folder, to compare with an
    uninterrupted run of the same config.
    """
    from rftlab import results

    run = spec.new_run(cfg, preset="smoke", out_root=out_root)
    save, saved = run.save_checkpoint, []

    def save_then_die(state):
        save(state)
        saved.append(1)
        if len(saved) == kill_after:
            raise KeyboardInterrupt

    run.save_checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        spec.run(cfg, run)
    run.finish("failed")
    if after_kill is not None:
        after_kill(run.path)
    resumed = results.reopen_run(run.path, ["test", "--resume"])
    spec.run(cfg, resumed)
    resumed.finish("complete")
    return run.path
