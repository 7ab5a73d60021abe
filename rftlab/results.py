"""Run folders: provenance, append-only metrics, tables, checkpoints, resume.

Layout of one run (``results/<experiment>/<run-id>/``, run-id = ``<UTC time>-<preset>-<config hash>``)::

    config.json       resolved config, experiment version, git sha + dirty flag, package versions,
                      device, argv, seed, start/end time, status (running / complete / failed)
    metrics.parquet   tidy: one row per logged (seed, stage, step), snake_case / namespaced columns
    metrics.jsonl     the append-only journal behind it while the run is live (see below)
    <table>.parquet   per-input / per-pair tables written whole, atomically
    checkpoints/      last.pt: the experiment's state plus how many metric rows it covers
    figures/          PNG (and PDF) written by ``rftlab plot``
    log.txt

In a run of several processes (``rftlab.distributed``) every process holds a :class:`Run` on the same folder and
only the main one writes: ``log``, ``write_table``, ``save_checkpoint``, ``info`` and ``finish`` do nothing on
the others (which still count their logged rows, so checkpoints agree), and reading (``load_checkpoint``) works
on all of them.

Why a JSON-lines journal: every ``run.log`` row is one line written and flushed at once, so a run
killed with SIGKILL keeps every row it logged (a torn last line is ignored on read). The journal is
compacted into ``metrics.parquet`` when the run ends; readers accept either.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rftlab.errors import RftlabError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.parquet"
JOURNAL_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoints/last.pt"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the source tree rftlab runs from (None outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5,
        )
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("rftlab", "torch", "numpy", "pandas", "transformers", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RftlabError(f"{path} does not exist: is {path.parent} a run folder?") from None
    except json.JSONDecodeError:
        raise RftlabError(f"{path} is corrupt (not JSON); re-run the experiment.") from None


@dataclass
class Run:
    """Handle an experiment's ``run(cfg, run)`` writes through. Created by :func:`create_run`."""

    path: Path
    meta: dict[str, Any]
    device: str = "cpu"  # torch device the experiment should use, resolved by the CLI
    progress_factory: Any = None  # callable(total, description) -> tracker with .advance(n); set by the CLI
    is_main: bool = True  # False on the other processes of a multi-process run: they write nothing
    precision: str = "fp32"  # autocast precision of training steps (rftlab.runtime.select_precision)
    compile: bool = False  # torch.compile the models of training steps (rftlab.runtime.maybe_compile)
    _rows_logged: int = field(default=0, init=False)

    @property
    def cache_dir(self) -> Path:
        """``<results root>/_cache``: stages shared between runs, keyed by a content hash."""
        return self.path.parent.parent / "_cache"

    # --- metrics -------------------------------------------------------------------------------
    def log(self, row: dict[str, Any] | None = None, **columns: Any) -> None:
        """Append one metrics row (a dict and/or keyword columns); flushed before returning."""
        self._rows_logged += 1
        if not self.is_main:
            return
        record = {**(row or {}), **columns}
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        with open(self.path / JOURNAL_FILE, "a") as fh:
            fh.write(line + "\n")
            fh.flush()

    def write_table(self, name: str, frame: Any) -> Path:
        """Write a per-input / per-pair table as ``<name>.parquet`` (atomically)."""
        target = self.path / f"{name}.parquet"
        if not self.is_main:
            return target
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # left only when writing failed
        return target

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Save the experiment's state (tensors, state dicts, numbers) for ``--resume``."""
        import torch

        if not self.is_main:
            return
        target = self.path / CHECKPOINT_FILE
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        torch.save({"state": state, "metrics_rows": self._rows_logged}, tmp)
        os.replace(tmp, target)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last saved state, or None for a fresh run.

        Metric rows logged after that checkpoint are dropped from the journal, since the experiment
        will log them again when it replays those steps.
        """
        saved = self._read_checkpoint()
        if saved is None:
            self._truncate_journal(0)
            return None
        self._truncate_journal(saved["metrics_rows"])
        return saved["state"]

    def _read_checkpoint(self, mmap: bool = False) -> dict[str, Any] | None:
        import torch

        target = self.path / CHECKPOINT_FILE
        if not target.exists():
            return None
        try:
            return torch.load(target, weights_only=True, mmap=mmap)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same user problem
            # torch's own message runs over many lines and blames weights_only; the type says enough
            raise RftlabError(f"checkpoint {target} is unreadable ({type(exc).__name__}); start a new run.") from None

    def _truncate_journal(self, keep: int) -> None:
        """Keep the first ``keep`` complete journal lines (a torn last line is dropped too)."""
        journal = self.path / JOURNAL_FILE
        if journal.exists() and self.is_main:
            lines = [ln for ln in journal.read_text().splitlines(keepends=True) if ln.endswith("\n")]
            atomic_write_text(journal, "".join(lines[:keep]))
        self._rows_logged = keep

    # --- console -------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """Append a line to log.txt and show it on stderr."""
        if not self.is_main:
            return
        with open(self.path / "log.txt", "a") as fh:
            fh.write(f"{utc_now()} {message}\n")
        print(message, file=sys.stderr)

    def progress(self, total: int, description: str) -> Any:
        """A progress tracker with ``advance(n=1)`` (a rich bar under the CLI, silent otherwise)."""
        if self.progress_factory is None or not self.is_main:
            return _SilentProgress()
        return self.progress_factory(total, description)

    # --- lifecycle -----------------------------------------------------------------------------
    def finish(self, status: str) -> None:
        """Compact the journal into metrics.parquet and record the end status."""
        if not self.is_main:
            return
        if (self.path / JOURNAL_FILE).exists():
            frame = read_metrics(self.path)
            tmp = self.path / f".{METRICS_FILE}.tmp"
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, self.path / METRICS_FILE)
            if status == "complete":
                (self.path / JOURNAL_FILE).unlink()
        self.meta.update(status=status, finished=utc_now())
        atomic_write_text(self.path / CONFIG_FILE, json.dumps(self.meta, indent=2))


class _SilentProgress:
    def advance(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _SilentProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _plain(value: Any) -> Any:
    """JSON-able scalar from numpy / torch scalars."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def create_run(
    *, experiment: str, version: int, preset: str, cfg: Any, out_root: Path, device: str,
    argv: list[str],
) -> Run:
    """Make ``<out_root>/<experiment>/<run-id>/`` and write its provenance as ``config.json``."""
    from rftlab.config import config_hash, to_dict

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = out_root / experiment / f"{stamp}-{preset}-{config_hash(cfg)}"
    path, n = base, 1
    while path.exists():  # two runs in the same second with the same config
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    meta = {
        "experiment": experiment,
        "version": version,
        "preset": preset,
        "run_id": path.name,
        "status": "running",
        "started": utc_now(),
        "finished": None,
        "seed": getattr(cfg, "seed", None),
        "device": device,
        "argv": argv,
        "git": git_state(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "config": to_dict(cfg),
    }
    atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2))
    return Run(path, meta)


def reopen_run(path: Path, argv: list[str]) -> Run:
    """Open an unfinished run folder for ``--resume``; its metrics journal continues."""
    meta = read_json(path / CONFIG_FILE)
    if meta.get("status") == "complete":
        raise RftlabError(f"run {path} is already complete; nothing to resume.")
    run = Run(path, meta)
    # The journal keeps only the rows the last checkpoint covers, whether or not the experiment calls
    # load_checkpoint: it replays everything after that checkpoint (or everything, without one), and a
    # torn last line must not be glued to the next appended row.
    saved = run._read_checkpoint(mmap=True)
    run._truncate_journal(saved["metrics_rows"] if saved else 0)
    meta.update(status="running", finished=None)
    meta.setdefault("resumed", []).append({"at": utc_now(), "argv": argv})
    atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2))
    return run


def attach_run(path: Path, is_main: bool) -> Run:
    """A handle on a run folder that another process created (or reopened), for one process of a multi-process
    run; it writes only when ``is_main``. Its journal holds the rows of the last checkpoint, so its row count
    starts there, as it does in the process that prepared the folder."""
    run = Run(path, read_json(path / CONFIG_FILE), is_main=is_main)
    saved = run._read_checkpoint(mmap=True)
    run._rows_logged = saved["metrics_rows"] if saved else 0
    return run


def read_metrics(run_dir: Path) -> Any:
    """The run's metrics as a DataFrame: the journal if the run is live or was killed, else parquet."""
    import pandas as pd

    journal = run_dir / JOURNAL_FILE
    if journal.exists():
        rows = []
        for line in journal.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line from a killed run
                rows.append(json.loads(line))
        return pd.DataFrame(rows)
    return read_table(run_dir, "metrics")


def read_table(run_dir: Path, name: str) -> Any:
    """Read ``<name>.parquet`` from a run folder, with a one-line error when missing or corrupt."""
    import pandas as pd

    path = run_dir / f"{name}.parquet"
    if not path.exists():
        raise RftlabError(f"{path} is missing: the run did not write it (status in {CONFIG_FILE}).")
    try:
        return pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise RftlabError(f"{path} is corrupt (unreadable parquet); re-run the experiment.") from None


def find_runs(folder: Path) -> list[Path]:
    """Run folders at ``folder``: the folder itself if it is a run, else its child runs in order."""
    if not folder.exists():
        raise RftlabError(f"{folder} does not exist; pass a run folder or an experiment folder.")
    if (folder / CONFIG_FILE).exists():
        return [folder]
    runs = sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).exists())
    if not runs:
        raise RftlabError(f"{folder} holds no run folders (no {CONFIG_FILE} inside).")
    return runs


def iter_complete(runs: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for run in runs:
        meta = read_json(run / CONFIG_FILE)
        if meta.get("status") == "complete":
            yield run, meta
