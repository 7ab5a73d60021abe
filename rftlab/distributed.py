"""Data parallelism across processes: the few helpers experiments call, each the identity in one process.

Processes are started by ``rftlab run ... --num-processes N`` (:mod:`rftlab.launch`), by ``accelerate launch`` or
by ``torchrun``; all of them set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Without ``WORLD_SIZE`` > 1 nothing here imports accelerate or touches ``torch.distributed``, and every helper
hands back its input (a one-process run computes exactly what it computed before these helpers existed). With
it, :func:`init` starts Accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA) and the helpers split, gather
and synchronise:

- training steps: every process draws the same global batch from the same seeded generator, takes its
  contiguous :func:`shard`, and steps a model wrapped by :func:`prepare` (PyTorch DDP), whose backward averages
  the gradients over processes. The average equals the full-batch gradient when each process's loss is a mean
  over an equal share of the batch (experiments require batch sizes divisible by the number of processes, see
  :func:`require_multiples`). Losses that average over tokens (SFT, PPO) are averaged per process, so a token
  of process r weighs 1/(N·n_r) instead of 1/Σ_r n_r (n_r: the tokens of its shard), as in DDP training loops
  generally: the full-batch gradient when the shards hold equally many tokens, a reweighting otherwise.
- per-input and per-pair measurements: the items (or fixed-size chunks of them) are split with
  Accelerate's ``split_between_processes`` (:func:`shard`), and the per-process results concatenated in the
  original order on every process (:func:`gather`).
- results: every process ends up holding the same gathered tables; only the main process writes them
  (:class:`rftlab.results.Run` gates its writes on ``is_main``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any

from rftlab.errors import RftlabError

_STATE: Any = None  # accelerate.PartialState once init() ran in a multi-process run


def world_size() -> int:
    """Number of processes of this run (1 unless a launcher set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """True in a run of several processes."""
    return world_size() > 1


def init(device: str) -> None:
    """Join the process group (once). ``device`` is the resolved ``--device``: on CPU Accelerate uses gloo; on
    CUDA NCCL, with process r on GPU ``LOCAL_RANK``. A no-op in one process."""
    global _STATE
    if not active() or _STATE is not None:
        return
    # rftlab's steps forward through models.unwrap(model) and call loss.backward() themselves: sharded wrappers
    # (FSDP's root unsharding, DeepSpeed's engine.backward) would be bypassed, so refuse rather than ignore them
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "").lower() in ("1", "true"):
            raise RftlabError(f"the Accelerate config asks for {name}; rftlab trains with DDP only (a config with "
                              "distributed_type MULTI_GPU, or --num-processes).")
    from accelerate import PartialState

    _STATE = PartialState(cpu=not device.startswith("cuda"))
    if _STATE.num_processes != world_size():  # e.g. Accelerate found no backend for this device
        raise RftlabError(f"WORLD_SIZE is {world_size()} but Accelerate set up {_STATE.num_processes} process(es) "
                          f"({_STATE.distributed_type}); launch with --num-processes or accelerate launch.")


def _state() -> Any:
    if _STATE is None:
        raise RuntimeError("rftlab.distributed.init(device) must run before collective calls in a multi-process run")
    return _STATE


def rank() -> int:
    """This process's index, 0 for the main process."""
    return _state().process_index if active() else 0


def is_main() -> bool:
    return rank() == 0


def device(default: str) -> str:
    """This process's torch device: ``default`` in one process, Accelerate's (``cuda:<local rank>`` or ``cpu``)
    in several."""
    if not active():
        return default
    dev = _state().device
    return "cpu" if dev.type == "cpu" else str(dev)


def shard(items: Iterable) -> list:
    """This process's contiguous share of ``items`` (Accelerate's ``split_between_processes``: the first
    len % N processes get one more; processes beyond len get none). All of ``items`` in one process."""
    items = list(items)
    if not active():
        return items
    with _state().split_between_processes(items) as part:
        return list(part)


def gather(items: list) -> list:
    """Every process's ``items`` concatenated in process order, on every process (``gather_object``); with
    :func:`shard` this restores the original order. ``items`` itself in one process."""
    if not active():
        return items
    from accelerate.utils import gather_object

    return gather_object(list(items))


def broadcast(value: Any) -> Any:
    """The main process's ``value``, on every process (any picklable object)."""
    if not active():
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def barrier() -> None:
    if active():
        _state().wait_for_everyone()


def main_process_first() -> contextlib.AbstractContextManager:
    """Run the block on the main process first, then on the others: e.g. build a cache once, then read it."""
    return _state().main_process_first() if active() else contextlib.nullcontext()


def import_now(*modules: str) -> None:
    """Import ``modules`` on every process at once (nothing in one process), ahead of a
    :func:`main_process_first` block that would otherwise import them one process after the other."""
    if active():
        import importlib

        for name in modules:
            importlib.import_module(name)


def mean(stats: Mapping[str, float]) -> dict[str, float]:
    """The process mean of each value of a step's statistics dict (same keys on every process). Over equal
    shards the mean of per-process means is the mean over the whole batch."""
    if not active():
        return dict(stats)
    every = gather([dict(stats)])
    return {key: sum(float(s[key]) for s in every) / len(every) for key in stats}


def chunk_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th chunk of a sampled measurement: ``seed`` itself for chunk 0, an independent
    stream (NumPy's SeedSequence of (seed, index)) for the others. Seeding by the chunk's global index makes the
    draws the same whichever process samples the chunk."""
    if index == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def seed_per_process(seed: int) -> None:
    """Reseed torch's global generator differently on each process (rollouts of different shards must not share
    their noise); nothing in one process, whose stream stays as it was."""
    if active():
        import torch

        torch.manual_seed(chunk_seed(seed, 1_000_003 + rank()))


def require_multiples(processes: int, sizes: Mapping[str, int]) -> None:
    """Raise a one-line error unless every ``name: size`` splits evenly over ``processes`` (equal shards keep
    the averaged gradient the full-batch one, and keep the processes' collective calls in step)."""
    bad = [f"{name}={size}" for name, size in sizes.items() if size % processes]
    if processes > 1 and bad:
        raise RftlabError(f"{', '.join(bad)} must be multiple(s) of --num-processes {processes}: each process takes "
                          "an equal share of every batch.")


@functools.cache
def _ddp_class() -> type:
    from torch.nn.parallel import DistributedDataParallel

    class DataParallel(DistributedDataParallel):
        """DDP that forwards unknown attributes (``config``, ``generate``, ...) to the wrapped model, so
        rftlab's step functions take it where they take the model; forwards through it synchronise gradients."""

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "module":
                    raise
                return getattr(self.module, name)

    return DataParallel


def prepare(model: Any, compile: bool = False) -> Any:
    """The module to pass to training steps: ``model`` with its forward compiled when ``compile`` (in place,
    :func:`rftlab.runtime.maybe_compile`), and in a multi-process run wrapped in DDP.

    A :class:`rftlab.models.PolicyWithValue` is returned itself with its language model, critic and value head
    each wrapped (the step functions recognise the policy by its class, and call its parts). Parameters are
    shared with ``model``: train through the returned module, measure ``model``. DDP broadcasts the main
    process's parameters at wrapping; ``broadcast_buffers=False`` because sampling runs a different number of
    forwards on each process (and these models' buffers are constants).
    """
    from rftlab import runtime
    from rftlab.models import PolicyWithValue

    if isinstance(model, PolicyWithValue):
        for name in ("model", "critic", "value_head"):
            part = getattr(model, name)
            if part is not None and any(p.requires_grad for p in part.parameters()):
                setattr(model, name, prepare(part, compile and name != "value_head"))
        return model
    runtime.maybe_compile(model, compile)
    if not active():
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    local = device("cpu")
    ids = [int(local.split(":")[1])] if local.startswith("cuda:") else None
    # no buffer sync in forward (torch 2.13 renamed the switch; both still sync once at wrapping)
    names = inspect.signature(DistributedDataParallel).parameters
    no_sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    return _ddp_class()(model, device_ids=ids, **{no_sync_kw: False})


def no_sync(model: Any) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of backwards inside the block (micro-batches before the last one)."""
    return model.no_sync() if hasattr(model, "no_sync") and active() else contextlib.nullcontext()


def parameter_spread(model: Any) -> float:
    """max over parameter entries of (largest − smallest value across processes): 0.0 when every process holds
    the same parameters (always 0.0 in one process). Two all-reduces per parameter tensor."""
    if not active():
        return 0.0
    import torch
    import torch.distributed as dist

    spread = 0.0
    with torch.no_grad():
        for p in model.parameters():
            hi, lo = p.detach().clone(), p.detach().clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            if hi.numel():
                spread = max(spread, (hi.double() - lo.double()).max().item())
    return spread


def check_in_sync(run: Any, model: Any, label: str) -> float:
    """Record :func:`parameter_spread` of ``model`` under ``label`` in the run's ``config.json``
    (``parameter_spread``) and warn when the processes' parameters differ; returns the spread."""
    spread = parameter_spread(model)
    if active():
        run.meta.setdefault("parameter_spread", {})[label] = spread
        if spread > 0:
            run.info(f"warning: parameters differ across processes after {label} (max |Δ| = {spread:.3g})")
    return spread
