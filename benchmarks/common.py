"""What every benchmark shares: the tiny models and tokenizer, precisions, interleaved timing, TRL stepping,
the row format and a record of the machine's load.

Models: randomly initialised GPT-2s (tied input/output embeddings) built by :func:`rftlab.models.build_model`
with a 1000-token byte-level BPE trained on CPython's bundled help text (``pydoc_data.topics``: no downloads,
the same tokenizer on every machine). Sizes are named ``<layers>x<width>``; the ``model`` column of a row adds
the precision: ``4x256-fp32``, ``2x128-bf16``. ``bf16`` is ``torch.autocast("cpu", dtype=torch.bfloat16)``
around the whole step (weights and optimizer state stay float32), which is what TRL's ``bf16=True`` does.

Timing: :func:`interleave` runs every implementation's unit of work in turn — A B C A B C … — for warm-up
rounds (discarded) then timed rounds, so a change in the machine's load hits every side alike. A unit returns
its per-step seconds (one or more steps). Rows report the median, min and max over all timed steps. Every
side runs in the main thread (:class:`TrainerSteps` says why).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

VOCAB = 1000
SIZES = {"2x128": (2, 128, 4), "4x256": (4, 256, 4), "1x32": (1, 32, 2)}  # layers, width, heads; 1x32: --quick
COLUMNS = ["benchmark", "model", "impl", "throughput", "unit", "median_s", "min_s", "max_s"]


def quiet_trl() -> None:
    """No progress bars or notices from datasets / transformers while the trainers are built."""
    import datasets
    from transformers.utils import logging

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference precompute has its own tqdm bar
    datasets.disable_progress_bars()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # save_pretrained's "Writing model shards"
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ models and data
@functools.cache
def corpus() -> tuple[str, ...]:
    """Paragraphs of CPython's bundled help text (ships with every Python, ~1 MB)."""
    from pydoc_data.topics import topics

    return tuple(p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40)


@functools.cache
def tokenizer():
    """A 1000-token byte-level BPE trained on :func:`corpus` (pad id 0, EOS id 1, no BOS added)."""
    from rftlab.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(list(corpus()), vocab_size=VOCAB)


def build_model(size: str, seed: int = 0):
    """A fresh GPT-2 of ``size`` ("4x256"), eval mode (dropout is 0 anyway), float32, seeded initialisation."""
    from rftlab.models import LMConfig, build_model

    n_layer, n_embd, n_head = SIZES[size]
    torch.manual_seed(seed)
    cfg = LMConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=128)
    return build_model(cfg, tokenizer()).eval()


def clone(model):
    """An independent copy with the same weights: every side trains its own copy of one initialisation."""
    return copy.deepcopy(model)


def text_pieces(tok, n_tokens: int, words: list[str], start: int) -> tuple[str, int]:
    """Words from ``start`` on until they make ≥ ``n_tokens`` tokens (with a leading space), and where they end."""
    end = start + 1
    while end < len(words) and len(tok(" " + " ".join(words[start:end]))["input_ids"]) < n_tokens:
        end += 1
    return " " + " ".join(words[start:end]), end


def preference_texts(n: int, prompt_tokens: int = 16, response_tokens: tuple[int, int] = (16, 32),
                     seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) strings cut from help paragraphs at word boundaries: a prompt of
    ≈``prompt_tokens`` tokens, responses of ≈U[lo, hi) tokens that start with a space (so the tokenization of
    prompt + response splits exactly at the prompt's end, for rftlab and TRL alike)."""
    tok, rng, out = tokenizer(), random.Random(seed), []
    texts = [t for t in corpus() if len(t.split()) > 80]
    while len(out) < n:
        words = rng.choice(texts).split()
        prompt, end = text_pieces(tok, prompt_tokens, words, 0)
        chosen, _ = text_pieces(tok, rng.randrange(*response_tokens), words, end)
        rejected, _ = text_pieces(tok, rng.randrange(*response_tokens), words, end + 2)
        out.append((prompt.lstrip(), chosen, rejected))
    return out


def prompts(n: int, prompt_tokens: int = 16, seed: int = 0) -> list[str]:
    """``n`` prompts of ≈``prompt_tokens`` tokens (paragraph openings cut at word boundaries)."""
    tok, rng = tokenizer(), random.Random(seed)
    texts = [t for t in corpus() if len(t.split()) > 40]
    return [text_pieces(tok, prompt_tokens, rng.choice(texts).split(), 0)[0].lstrip() for _ in range(n)]


def count_e(prompt_index: list[int], completions: list[str]) -> list[float]:
    """A cheap deterministic reward with spread within a group: the share of letters that are "e"."""
    return [sum(c == "e" for c in text) / max(1, sum(c.isalpha() for c in text)) for text in completions]


def trl_count_e(prompts: list, completions: list, **_) -> list[float]:
    """:func:`count_e` in the signature of TRL's reward functions."""
    return count_e([], completions)


# ------------------------------------------------------------------------------------------ precision
def precision_context(precision: str):
    """float32 as is; bf16 = CPU autocast to bfloat16 (matmuls and attention in bf16, norms/softmax in float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


# ------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object], steps: int = 1) -> Callable[[], list[float]]:
    """A unit of ``steps`` calls of ``fn``, each timed on its own."""
    def unit() -> list[float]:
        out = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out
    return unit


def interleave(units: dict[str, Callable[[], list[float]]], rounds: int, warmup: int = 1,
               log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Run ``units`` in turn for ``warmup`` + ``rounds`` rounds; the per-step seconds of the timed rounds."""
    times: dict[str, list[float]] = {name: [] for name in units}
    for r in range(warmup + rounds):
        for name, unit in units.items():
            seconds = unit()
            if r >= warmup:
                times[name].extend(seconds)
        if log is not None:
            log(f"  round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else "") + ": " + ", ".join(
                f"{n} {statistics.median(t):.3f}s" for n, t in times.items() if t))
    return times


def row(benchmark: str, model: str, impl: str, items: float, unit: str, seconds: list[float]) -> dict:
    """One result row: ``items`` per step over the median step time."""
    median = statistics.median(seconds)
    return {"benchmark": benchmark, "model": model, "impl": impl, "throughput": items / median, "unit": unit,
            "median_s": median, "min_s": min(seconds), "max_s": max(seconds)}


class TrainerSteps:
    """Time a Hugging Face Trainer (TRL's) per optimizer step, in chunks, in the calling thread.

    A unit of ``steps`` calls ``trainer.train()`` for ``steps + 1`` optimizer steps (the optimizer, its state and
    the model carry over from call to call) and returns the ``steps`` intervals between consecutive ends of
    steps: everything the trainer's loop does between two updates (data loading, collation, forward, backward,
    optimizer, logging checks, callbacks), without the first step of the call, which also pays ``train()``'s
    set-up. Why not a worker thread parked between steps: once a second thread has run torch's OpenMP regions,
    GNU OpenMP manages more threads than there are cores and throttles its spin-waits, which slowed every side's
    steps by 40–60% on 2 cores; all sides run in the main thread instead.
    """

    def __init__(self, trainer) -> None:
        from transformers import PrinterCallback, ProgressCallback, TrainerCallback

        self.trainer = trainer
        for quiet in (PrinterCallback, ProgressCallback):  # the end-of-training summary line, progress bars
            trainer.remove_callback(quiet)
        self._ends: list[float] = []
        ends = self._ends

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        trainer.add_callback(Clock())

    def unit(self, steps: int = 1) -> Callable[[], list[float]]:
        def run() -> list[float]:
            self._ends.clear()
            self.trainer.args.max_steps = steps + 1
            self.trainer.train()
            if len(self._ends) != steps + 1:
                raise RuntimeError(f"the trainer ran {len(self._ends)} steps, not {steps + 1}")
            return [b - a for a, b in zip(self._ends, self._ends[1:], strict=False)]
        return run

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ process settings
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (no mmap per large block, no trimming), process-wide.

    A training step allocates and frees the same tens of megabytes of activations every step; by default glibc
    serves blocks above its mmap threshold with fresh mmaps and returns them on free, so every step pays page
    faults and kernel zeroing for them again (10–30% of a 4 × 256 step here). This is the usual fix for PyTorch
    on CPU (jemalloc / tcmalloc do the same). It applies to every side of every benchmark alike. Returns False
    where glibc is not the allocator.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 1 << 30)
                and libc.mallopt(m_top_pad, 64 << 20))


# ------------------------------------------------------------------------------------------ load
def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot (Linux /proc/stat)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def _own_jiffies() -> int:
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # utime stime cutime cstime


@dataclass
class LoadMonitor:
    """The machine's load around a run: load averages, and the share of CPU time other processes took."""

    start: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> dict:
        try:
            busy, total = _busy_jiffies()
            return {"busy": busy, "total": total, "own": _own_jiffies(), "load": os.getloadavg()}
        except OSError:  # not Linux
            return {"load": os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3}

    def summary(self) -> dict:
        end = self._sample()
        out = {"loadavg_start": list(self.start["load"]), "loadavg_end": list(end["load"]), "cpus": os.cpu_count()}
        if "busy" in end and "busy" in self.start:
            total = end["total"] - self.start["total"]
            others = (end["busy"] - self.start["busy"]) - (end["own"] - self.start["own"])
            out["other_processes_cpu_share"] = max(0.0, others / total) if total else float("nan")
            out["own_cpu_share"] = (end["own"] - self.start["own"]) / total if total else float("nan")
        return out
