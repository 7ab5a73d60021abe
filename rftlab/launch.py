"""Running ``rftlab run`` on several processes: starting them, and the run folder they share.

Two ways in, one worker code path:

- ``rftlab run NAME --num-processes N`` resolves and checks the config and creates the run folder in the
  calling process, then starts N copies of the same command (``python -m rftlab.cli run ...``) with the
  environment ``torchrun`` would set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``) plus ``RFTLAB_RUN_DIR``, the folder, and ``OMP_NUM_THREADS`` = cores / N when
  unset. Process 0 keeps the terminal (progress bars, the folder's path on stdout); the others write to
  ``<run>/process-<r>.log``. When one process fails, the launcher stops the rest and exits non-zero with one
  ``error:`` line naming the process and its last log line (process 0 prints its own error, as a one-process
  run does).
- ``accelerate launch [--config_file ...] -m rftlab.cli run NAME ...`` or ``torchrun ... -m rftlab.cli run ...``:
  the main process creates the run folder and broadcasts its path.

Either way each worker joins the process group through Accelerate (:func:`rftlab.distributed.init`) and opens a
:class:`rftlab.results.Run` on the shared folder; only the main process's handle writes. Experiments opt in by
defining ``check_processes(cfg, n)``, which raises a one-line error when ``cfg`` cannot be split over n processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rftlab import distributed, results
from rftlab.errors import RftlabError

RUN_DIR_ENV = "RFTLAB_RUN_DIR"
# A worker that fails waits this long before reporting: if the failure was caused by another process dying
# (a collective whose peer vanished), the launcher, which saw that process exit first, stops this one meanwhile,
# so only the first failure is reported.
FAILURE_GRACE_S = 2.0


def check(spec: Any, cfg: Any, processes: int, device: str = "cpu") -> None:
    """Raise a one-line error unless ``spec``'s experiment runs on ``processes`` processes (the launcher's count,
    or the world size inside a launched process) on ``device``."""
    import importlib.util

    n = distributed.world_size() if distributed.active() else processes
    if n < 1:
        raise RftlabError(f"--num-processes must be at least 1, got {n}.")
    if n == 1:
        return
    hook = getattr(spec.module, "check_processes", None)
    if hook is None:
        from rftlab import registry

        able = [s.name for s in registry.discover().values() if hasattr(s.module, "check_processes")]
        raise RftlabError(f"{spec.name} runs on one process only; several processes work with: {', '.join(able)}.")
    if importlib.util.find_spec("accelerate") is None:
        raise RftlabError("several processes need accelerate: pip install accelerate.")
    if device.startswith("cuda") and not distributed.active():  # launched workers: their launcher placed them
        import torch

        if n > torch.cuda.device_count():
            raise RftlabError(f"--num-processes {n} on CUDA puts one process on each GPU, but torch sees "
                              f"{torch.cuda.device_count()}; use at most that many, or --device cpu.")
    hook(cfg, n)


def open_run(spec: Any, cfg: Any, create: Callable[[], results.Run], *, processes: int,
             device: str) -> results.Run:
    """The run handle of this process. One process, or the launcher of ``processes`` > 1: ``create()``. A
    launched process: the folder named by ``RFTLAB_RUN_DIR``, or, without it, the one the main process creates
    and broadcasts (``accelerate launch`` / ``torchrun``)."""
    check(spec, cfg, processes, device)
    if not distributed.active():
        run = create()
        if processes > 1:
            _record_processes(run, processes)
        return run
    distributed.init(device)
    folder = os.environ.get(RUN_DIR_ENV)
    if folder is None:
        made = create() if distributed.is_main() else None
        if made is not None:
            _record_processes(made, distributed.world_size())
        folder = distributed.broadcast(str(made.path) if made is not None else None)
        if made is not None:
            return made
    return results.attach_run(Path(folder), is_main=distributed.is_main())


def _record_processes(run: results.Run, processes: int) -> None:
    run.meta["processes"] = processes
    results.atomic_write_text(run.path / results.CONFIG_FILE, json.dumps(run.meta, indent=2))


def is_launcher(processes: int) -> bool:
    """True in the process that should start ``processes`` workers rather than run the experiment itself."""
    return processes > 1 and not distributed.active()


def spawn(run: results.Run, processes: int, command: list[str] | None = None) -> int:
    """Start ``processes`` workers on ``run``'s folder, each running ``command`` (default: this very command,
    ``python -m rftlab.cli <its arguments>``); wait for them and return the exit status: 0, or that of the first
    process to fail."""
    command = command or [sys.executable, "-m", "rftlab.cli", *sys.argv[1:]]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), RUN_DIR_ENV: str(run.path)}
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    workers: list[subprocess.Popen] = []
    logs: list[Path | None] = []
    for rank in range(processes):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        log = None if rank == 0 else run.path / f"process-{rank}.log"
        err = open(log, "w") if log else None  # noqa: SIM115 - the child keeps its own descriptor
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL if rank else None, stderr=err))
        if err is not None:
            err.close()
        logs.append(log)
    try:
        failed = _wait(workers)
    except KeyboardInterrupt:  # the workers got the same SIGINT: let them mark the run and exit
        _stop(workers, grace=10.0, terminate=False)
        return 130
    if failed is None:
        return 0
    rank, code = failed
    _stop(workers, grace=5.0, terminate=True)
    _mark_failed(run.path)
    if rank > 0:  # process 0 has shown its own error on the terminal
        last = _last_line(logs[rank])
        print(f"error: process {rank} of {processes} failed (exit status {code})"
              f"{': ' + last if last else ''}; its output is in {logs[rank]}", file=sys.stderr)
    return code if code > 0 else 1


def on_worker_failure(exc: BaseException) -> None:
    """Called by a launched worker as it fails: wait :data:`FAILURE_GRACE_S` so that the launcher, when the
    failure is the echo of another process's, stops this process before it reports anything."""
    if distributed.active() and RUN_DIR_ENV in os.environ and not isinstance(exc, KeyboardInterrupt):
        time.sleep(FAILURE_GRACE_S)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(workers: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Poll until every worker exited (None) or one failed: (its rank, its exit status)."""
    while True:
        codes = [w.poll() for w in workers]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                return rank, code
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)


def _stop(workers: list[subprocess.Popen], grace: float, terminate: bool) -> None:
    """Give running workers ``grace`` seconds to exit (after SIGTERM when ``terminate``), then kill them."""
    deadline = time.monotonic() + grace
    for w in workers:
        if terminate and w.poll() is None:
            w.terminate()
    for w in workers:
        try:
            w.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


def _mark_failed(path: Path) -> None:
    """Record a failed run whose main process was stopped before it could (status still running)."""
    meta = results.read_json(path / results.CONFIG_FILE)
    if meta.get("status") == "running":
        results.Run(path, meta).finish("failed")


def _last_line(log: Path) -> str:
    """The last non-empty line of a worker's output, without torch's ``[rank1]:`` prefix or an ``error:``."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    last = re.sub(r"^\[rank\d+\]:\s*", "", lines[-1]) if lines else ""
    return last.removeprefix("error: ")
