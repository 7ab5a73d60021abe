"""Run the benchmarks, print one table, write a run folder.

    python -m benchmarks [NAME ...] [--quick] [--rounds 3] [--threads 2] [--no-trl] [--out results]
    rftlab bench [NAME ...] [same options]

NAMEs (default: all): ``dpo-step``, ``group-rft-step``, ``pair-grad-stats``, ``reward-std``, ``flops`` (see each
module's docstring for exactly what every side does per step). Every benchmark runs its sides on the same tiny
models and data, interleaved (A B C A B C …, warm-up rounds discarded), on ``--threads`` torch threads.

The run folder ``<out>/bench/<UTC time>-<full|quick>[-names]/`` holds ``benchmarks.parquet`` (one row per
benchmark × model × impl: ``benchmark, model, impl, throughput, unit, median_s, min_s, max_s``; ``model`` is
``<size>-<precision>``, e.g. ``4x256-bf16``), ``table.md`` (what was printed) and ``config.json`` (settings,
package versions, git state, CPU, and the machine's load during the run: load averages and the share of CPU
time other processes took). The table gives, per benchmark and model, each row's throughput and how many times
faster the rftlab side is (``rftlab ×``: rftlab's throughput over the row's); ``flops`` rows add their share of
the measured matmul peak; a last section checks the must-show targets against the numbers of this run.

Process settings, the same for every side: ``--threads`` torch threads, and glibc's malloc told to keep freed
memory for reuse (:func:`benchmarks.common.keep_freed_memory`; otherwise every step page-faults its activations in
again).

TRL is an optional extra (``pip install -e .[bench]``, which leaves the installed torch alone); without it the
TRL rows are skipped with a note. ``--quick`` runs every benchmark on a 1 × 32 model for one round: a check of
the harness (the tests use it), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import common

BENCHMARKS = ("dpo-step", "group-rft-step", "pair-grad-stats", "reward-std", "flops")
PRIMARY = {"dpo-step": "rftlab", "group-rft-step": "rftlab", "pair-grad-stats": "fast", "reward-std": "rftlab",
           "flops": "rftlab"}


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_one(name: str, quick: bool, rounds: int, trl: bool, log: Callable[[str], None]) -> list[dict]:
    """One benchmark's rows with the full (or --quick) settings."""
    sizes = ["1x32"] if quick else ["2x128", "4x256"]
    precisions = ["fp32"] if quick else ["fp32", "bf16"]
    warmup = 0 if quick else 1
    if name == "dpo-step":
        from benchmarks import dpo_step

        return dpo_step.run(sizes, precisions, rounds, 1 if quick else 2, warmup, trl, log)
    if name == "group-rft-step":
        from benchmarks import group_rft_step

        # 2 timed steps a round (as dpo-step): on a shared machine 3 samples a side leave the median ±20%
        return group_rft_step.run(sizes, precisions, rounds, 1 if quick else 2, warmup, trl, log,
                                  new_tokens=8 if quick else 32)
    if name == "pair-grad-stats":
        from benchmarks import pair_grad_stats

        return pair_grad_stats.run(tuple(sizes[::-1]), rounds, warmup, log, n_pairs=4 if quick else 64)
    if name == "reward-std":
        from benchmarks import sampling

        if quick:
            return sampling.run("1x32", n_prompts=16, k=4, new_tokens=8, reference_prompts=4, rounds=1, log=log)
        return sampling.run("2x128", rounds=min(rounds, 2), log=log)
    if name == "flops":
        from benchmarks import flops

        if quick:
            return flops.run(sizes, precisions, rounds, 1, 0, log, peak_seconds=0.02, peak_shapes=((256, 256, 256),))
        return flops.run(sizes[::-1], precisions, rounds, 2, warmup, log)
    raise ValueError(name)


def run(names: Sequence[str] | None = None, *, quick: bool = False, rounds: int | None = None, threads: int = 2,
        trl: bool | None = None, out: Path = Path("results"), log: Callable[[str], None] = _err,
        echo: Callable[[str], None] = print) -> Path:
    """Run ``names`` (all when None), print the table with ``echo``, write the run folder; return its path."""
    from rftlab.errors import RftlabError

    names = list(names or BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise RftlabError(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}.")
    rounds = rounds if rounds is not None else (1 if quick else 3)
    if rounds < 1:
        raise RftlabError(f"--rounds must be at least 1, got {rounds}.")
    notes = []
    have_trl = common.trl_available()
    if trl is None:
        trl = have_trl
    elif trl and not have_trl:
        raise RftlabError("TRL is not installed: pip install -e .[bench] (or drop --trl).")
    if not have_trl:
        notes.append("TRL is not installed: the trl rows are skipped (install the extra: pip install -e .[bench]).")
    elif not trl:
        notes.append("TRL rows skipped (--no-trl).")
    if threads > 0:
        torch.set_num_threads(threads)
    malloc = common.keep_freed_memory()
    if not malloc:
        notes.append("glibc malloc not found: freed memory is returned to the system between steps.")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    suffix = "" if names == list(BENCHMARKS) else "-" + "+".join(names)
    folder = Path(out) / "bench" / f"{stamp}-{'quick' if quick else 'full'}{suffix}"
    folder.mkdir(parents=True, exist_ok=False)
    started, monitor = time.time(), common.LoadMonitor()
    log(f"benchmarks: {', '.join(names)} on {torch.get_num_threads()} torch thread(s){' (quick)' if quick else ''}")
    rows: list[dict] = []
    for name in names:
        rows += _run_one(name, quick, rounds, trl, log)
    load = monitor.summary()
    elapsed = time.time() - started
    import pandas as pd

    frame = pd.DataFrame(rows, columns=common.COLUMNS)
    frame.to_parquet(folder / "benchmarks.parquet", index=False)
    table = format_table(frame, quick)
    conditions = (f"{torch.get_num_threads()} torch thread(s), {load.get('cpus')} CPUs; load average "
                  f"{load['loadavg_start'][0]:.2f} → {load['loadavg_end'][0]:.2f}; other processes took "
                  f"{100 * load.get('other_processes_cpu_share', float('nan')):.0f}% of the CPU time during the run; "
                  f"{elapsed:.0f} s")
    text = "\n".join([table, "", f"Conditions: {conditions}.", *[f"Note: {n}" for n in notes]])
    echo(text)
    (folder / "table.md").write_text(text + "\n")
    meta = _provenance(names, quick, rounds, trl, load, elapsed) | {"malloc_keeps_freed_memory": malloc}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def _provenance(names, quick, rounds, trl, load, elapsed) -> dict:
    from rftlab.results import git_state, package_versions

    versions = package_versions()
    for package in ("trl", "accelerate", "datasets"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
            versions[package] = None
    return {"benchmarks": names, "quick": quick, "rounds": rounds, "trl": trl, "threads": torch.get_num_threads(),
            "argv": sys.argv, "cpu": _cpu_name(), "platform": platform.platform(), "versions": versions,
            "git": git_state(), "load": load, "elapsed_s": elapsed}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------------------------ table
def format_table(frame, quick: bool = False) -> str:
    """Markdown table of the rows with the rftlab ratio per row, flops' share of the peak, then the targets."""
    lines = ["| benchmark | model | impl | throughput | unit | median s | min–max s | rftlab × | % of peak |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    peaks = {r.model.removeprefix("matmul-"): r.throughput for r in frame.itertuples()
             if r.benchmark == "flops" and r.impl == "matmul-peak"}
    for r in frame.itertuples():
        primary = frame[(frame.benchmark == r.benchmark) & (frame.model == r.model)
                        & (frame.impl == PRIMARY.get(r.benchmark))]
        ratio = "" if primary.empty or r.impl == "matmul-peak" else f"{primary.throughput.iloc[0] / r.throughput:.2f}"
        share = ""
        if r.benchmark == "flops":
            peak = peaks.get(r.model.rsplit("-", 1)[-1])
            share = f"{100 * r.throughput / peak:.0f}%" if peak else ""
        lines.append(f"| {r.benchmark} | {r.model} | {r.impl} | {r.throughput:.1f} | {r.unit} | {r.median_s:.3f} | "
                     f"{r.min_s:.3f}–{r.max_s:.3f} | {ratio} | {share} |")
    targets = check_targets(frame)
    if targets:
        lines += ["", "Targets" + (" (--quick: tiny models, not a measurement)" if quick else "") + ":"]
        lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in targets]
    return "\n".join(lines)


def check_targets(frame) -> list[tuple[bool, str]]:
    """The must-show targets, evaluated on this run's medians (only for rows present): dpo-step ≥ 1.5× TRL (fp32
    against TRL fp32, bf16 against TRL's defaults) and ≥ the minimal loop, with the reference amortised as the
    ``rftlab`` row is (and, stricter, with none: ``rftlab-1epoch``); group-rft-step ≥ 1.5× TRL at β = 0;
    pair-grad-stats on 4 × 256: fast ≥ 1.5× faster than the exact loop and ≤ 1.5× the floor's time; reward-std
    under 30 s on 2 × 128 and faster than the per-input loop; flops: the rftlab fp32 4 × 256 step ≥ 60% of the
    measured fp32 matmul peak."""
    def value(benchmark: str, model: str, impl: str, column: str = "throughput") -> float | None:
        sel = frame[(frame.benchmark == benchmark) & (frame.model == model) & (frame.impl == impl)]
        return None if sel.empty else float(sel[column].iloc[0])

    out = []
    for model in sorted(set(frame[frame.benchmark == "dpo-step"].model)):
        rft = value("dpo-step", model, "rftlab")
        trl, minimal = value("dpo-step", model, "trl"), value("dpo-step", model, "minimal")
        side = "TRL fp32" if model.endswith("fp32") else "TRL defaults"
        if rft and trl:
            out.append((rft >= 1.5 * trl, f"dpo-step {model}: rftlab {rft:.1f} pairs/s = {rft / trl:.2f}× {side} "
                                          f"{trl:.1f} (≥ 1.5×)"))
        if rft and minimal:
            out.append((rft >= minimal, f"dpo-step {model}: rftlab {rft:.1f} pairs/s = {rft / minimal:.2f}× the "
                                        f"minimal loop {minimal:.1f} (≥ 1×)"))
        worst = value("dpo-step", model, "rftlab-1epoch")
        if worst and trl and minimal:  # the same targets with no amortisation at all: reported, marked as a check
            out.append((worst >= 1.5 * trl and worst >= minimal,
                        f"dpo-step {model}, reference pass paid in full at every step (rftlab-1epoch, stricter than "
                        f"the target): {worst:.1f} pairs/s = {worst / trl:.2f}× {side}, {worst / minimal:.2f}× the "
                        f"minimal loop (≥ 1.5×, ≥ 1×)"))
    for model in sorted(set(frame[frame.benchmark == "group-rft-step"].model)):
        rft, trl = value("group-rft-step", model, "rftlab"), value("group-rft-step", model, "trl-beta0")
        if rft and trl:
            out.append((rft >= 1.5 * trl, f"group-rft-step {model}: rftlab {rft:.1f} completions/s = {rft / trl:.2f}× "
                                          f"TRL β=0 {trl:.1f} (≥ 1.5×)"))
    for model in sorted(set(frame[frame.benchmark == "pair-grad-stats"].model)):
        if not model.startswith("4x256"):
            continue
        fast, exact = value("pair-grad-stats", model, "fast", "median_s"), value("pair-grad-stats", model,
                                                                                "exact-loop", "median_s")
        floor = value("pair-grad-stats", model, "floor", "median_s")
        out.append((exact / fast >= 1.5, f"pair-grad-stats {model}: fast is {exact / fast:.2f}× the exact loop "
                                         f"(≥ 1.5×)"))
        out.append((fast / floor <= 1.5, f"pair-grad-stats {model}: fast takes {fast / floor:.2f}× the floor "
                                         f"(≤ 1.5×)"))
    for model in sorted(set(frame[frame.benchmark == "reward-std"].model)):
        rft, loop = value("reward-std", model, "rftlab", "median_s"), value("reward-std", model, "per-input-loop",
                                                                             "median_s")
        if model.startswith("2x128"):
            out.append((rft < 30, f"reward-std {model}: rftlab {rft:.1f} s for the whole set (< 30 s)"))
        out.append((rft < loop, f"reward-std {model}: rftlab {rft:.1f} s vs the per-input loop {loop:.1f} s "
                                f"({loop / rft:.1f}× faster)"))
    peak = value("flops", "matmul-fp32", "matmul-peak")
    rft = value("flops", "4x256-fp32", "rftlab")
    if peak and rft:
        out.append((rft >= 0.6 * peak, f"flops 4x256-fp32: the rftlab DPO step executes {rft:.0f} GFLOP/s = "
                                       f"{100 * rft / peak:.0f}% of the measured fp32 matmul peak {peak:.0f} (≥ 60%)"))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (a harness check)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL rows")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")
    args = parser.parse_args(argv)
    folder = run(args.names, quick=args.quick, rounds=args.rounds, threads=args.threads,
                 trl=False if args.no_trl else None, out=args.out)
    print(folder)
