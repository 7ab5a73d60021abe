"""The ``rftlab`` command: list, run and plot experiments.

Only light modules are imported at start-up; torch, pandas and matplotlib load inside commands.
User mistakes raise :class:`RftlabError` and end as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from rftlab.errors import RftlabError

app = typer.Typer(
    help="rftlab: reproduce and diagnose vanishing gradients in RL finetuning (Razin et al. 2024) "
    "and gradient entanglement in margin-based preference losses (Yuan et al. 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _user_errors(command: Callable) -> Callable:
    """Turn RftlabError into one stderr line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RftlabError as exc:
            message = " ".join(str(exc).split("\n"))  # the contract is one line, whatever the cause says
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@app.command("list")
@_user_errors
def list_experiments(
    name: str = typer.Argument(None, help="Show one experiment's details: config keys, presets, metrics."),
) -> None:
    """List the experiments, or describe one."""
    from rich.console import Console
    from rich.table import Table

    from rftlab import registry

    console = Console()
    if name is None:
        table = Table(title="rftlab experiments")
        for col in ("name", "paper", "reproduces", "presets", "CPU default"):
            table.add_column(col)
        for spec in registry.discover().values():
            table.add_row(
                spec.name, spec.paper, spec.figure, ", ".join(registry.presets(spec.name)), spec.cpu_runtime
            )
        console.print(table)
        console.print("Details: rftlab list <name>.  Run: rftlab run <name> [--preset P] [key=value ...]")
        return
    _describe(console, _spec_of(name))


def _describe(console: Any, spec: Any) -> None:
    import dataclasses
    import inspect

    from rich.markup import escape
    from rich.table import Table

    from rftlab import config, registry

    # Types, defaults and comments hold brackets ("tuple[int, ...]", "[-1, 1]") that rich would
    # otherwise take for markup tags and drop.
    console.print(f"[bold]{escape(spec.name)}[/bold] — {escape(spec.paper)}, {escape(spec.figure)} "
                  f"(version {spec.version})")
    console.print(escape(inspect.getdoc(spec.module) or ""))
    if spec.cpu_runtime:  # experiments; diagnoses have no presets
        console.print(f"\nPresets: {', '.join(registry.presets(spec.name)) or '(none)'}; "
                      f"default preset on CPU: {spec.cpu_runtime}")
    table = Table(title="config (rftlab run ... key=value)")
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col)

    def add(cls: type, prefix: str) -> None:
        comments = config.field_comments(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = config.field_types(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                add(tp, f"{prefix}{f.name}.")
            else:
                table.add_row(escape(f"{prefix}{f.name}"), escape(config.type_name(tp)),
                              escape(repr(getattr(defaults, f.name))), escape(comments.get(f.name, "")))

    add(spec.config_cls, "")
    console.print(table)
    if spec.metrics:
        glossary = Table(title="metrics and tables")
        glossary.add_column("column")
        glossary.add_column("meaning")
        for col, meaning in spec.metrics.items():
            glossary.add_row(escape(col), escape(meaning))
        console.print(glossary)


@contextlib.contextmanager
def _progress_bars() -> Iterator[Callable]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_stderr_console()) as progress:

        class Tracker:
            def __init__(self, total: int, description: str) -> None:
                self.task = progress.add_task(description, total=total)

            def advance(self, n: int = 1) -> None:
                progress.advance(self.task, n)

            def __enter__(self) -> Tracker:
                return self

            def __exit__(self, *exc: object) -> None:
                progress.refresh()

        yield Tracker


def _training_precision(spec, requested: str, compile_model: bool, device: str) -> str:
    """The autocast precision of ``spec``'s training steps. Experiments whose module sets ``TRAINING_OPTIONS``
    train under ``--precision`` and ``--compile``; the others always train in fp32, uncompiled, so asking them
    for bf16 or compilation is an error rather than an option silently ignored."""
    from rftlab import registry, runtime

    chosen = runtime.select_precision(requested, device)
    if getattr(spec.module, "TRAINING_OPTIONS", False):
        return chosen
    if requested == "bf16" or compile_model:
        able = [s.name for s in registry.discover().values() if getattr(s.module, "TRAINING_OPTIONS", False)]
        raise RftlabError(f"{spec.name} trains in fp32 without torch.compile; --precision bf16 and --compile apply "
                          f"to: {', '.join(able)}.")
    return "fp32"


@app.command()
@_user_errors
def run(
    name: str = typer.Argument(..., help="Experiment name (see `rftlab list`)."),
    overrides: list[str] = typer.Argument(None, help="Config overrides as key=value words."),
    preset: str = typer.Option("default", "--preset", "-p", help="Preset: smoke, default, paper, ..."),
    set_: list[str] = typer.Option(None, "--set", "-s", help="Override one config key: key=value."),
    config_file: Path = typer.Option(None, "--config", "-c", help="A TOML file of config values."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Results root folder."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(None, "--seed", help="Seed (overrides the config's seed)."),
    resume: Path = typer.Option(None, "--resume", help="Continue an unfinished run folder."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png or pdf."),
    num_processes: int = typer.Option(1, "--num-processes", help="Data-parallel processes (DDP; gloo on CPU, NCCL "
                                      "on CUDA); grue and margin-losses. Or start rftlab under accelerate launch."),
    precision: str = typer.Option("auto", "--precision", help="Training steps: auto (bf16 autocast on CUDA with "
                                  "native bf16, else fp32), fp32 or bf16."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the models of training steps."),
) -> None:
    """Run an experiment: write a run folder, render its figures, print the folder's path."""
    from rftlab import config, distributed, launch, registry, results, runtime

    spec = registry.get(name)
    _check_format(fmt)
    runtime.check_torch_for_transformers()
    precision = _training_precision(spec, precision, compile_model, runtime.resolve_device(device))
    words = list(set_ or []) + list(overrides or [])
    if seed is not None:
        words.append(f"seed={seed}")
    argv = ["rftlab", *sys.argv[1:]]
    if resume is not None:
        meta = results.read_json(resume / results.CONFIG_FILE)
        if meta.get("experiment") != spec.name:
            raise RftlabError(f"{resume} is a run of {meta.get('experiment')!r}, not {spec.name!r}.")
        if meta.get("version") != spec.version:
            raise RftlabError(f"{resume} was made by version {meta.get('version')} of {spec.name}; "
                              f"this rftlab has version {spec.version}. Start a new run.")
        saved = [(str(resume / results.CONFIG_FILE), meta["config"])]
        cfg = config.resolve(spec.config_cls, saved, words)
        if cfg != config.resolve(spec.config_cls, saved):  # a resumed run must match what it logged
            raise RftlabError(f"--resume continues {resume} with its saved config; drop the overrides "
                              f"({' '.join(words)}) or start a new run.")
        spec.check(cfg)
        dev = runtime.resolve_device(device)
        handle = launch.open_run(spec, cfg, lambda: results.reopen_run(resume, argv), processes=num_processes,
                                 device=dev)
    else:
        cfg = registry.preset_config(spec, preset, words, config_file)
        spec.check(cfg)
        dev = runtime.resolve_device(device)
        handle = launch.open_run(spec, cfg, lambda: spec.new_run(cfg, preset=preset, out_root=out, device=dev,
                                                                  argv=argv), processes=num_processes, device=dev)
    if launch.is_launcher(num_processes):  # the workers re-run this command on the folder just made
        raise typer.Exit(launch.spawn(handle, num_processes))
    handle.device = distributed.device(dev)
    handle.precision, handle.compile = precision, compile_model
    handle.meta.update(precision=precision, compile=compile_model)
    handle.info(f"{spec.name}: run folder {handle.path}")
    try:
        with _progress_bars() as factory:
            handle.progress_factory = factory
            spec.run(cfg, handle)
    except KeyboardInterrupt:
        handle.finish("failed")
        typer.echo(f"interrupted; resume with: rftlab run {spec.name} --resume {handle.path}", err=True)
        raise typer.Exit(130) from None
    except BaseException as exc:
        handle.finish("failed")
        launch.on_worker_failure(exc)
        raise
    handle.finish("complete")
    if not handle.is_main:  # the main process renders figures and prints the path
        return
    figures = spec.plot([handle.path], handle.path / "figures", fmt)
    for fig in figures:
        handle.info(f"figure: {fig}")
    typer.echo(str(handle.path))


diagnose_app = typer.Typer(
    help="Diagnose your own model and data: prompts whose reward std (and so RL gradient) vanishes, and "
    "preference pairs whose gradients are entangled.", no_args_is_help=True)
app.add_typer(diagnose_app, name="diagnose")


def _diagnose(kind: str, options: dict[str, Any], overrides: list[str] | None, out: Path, device: str,
              fmt: str, processes: int = 1) -> None:
    """Resolve ``diagnose <kind>``'s config (flags, then key=value words), run it, print its summary and the
    run folder's path (last, as ``rftlab run`` does)."""
    from rich.console import Console
    from rich.markdown import Markdown

    from rftlab import config, diagnose, runtime

    _check_format(fmt)
    runtime.check_torch_for_transformers()
    spec = diagnose.spec(kind)
    flags = {k: v for k, v in options.items() if v is not None}
    cfg = config.resolve(spec.config_cls, [("command-line flags", flags)], list(overrides or []))
    dev = runtime.resolve_device(device)
    with _progress_bars() as factory:
        folder = diagnose.execute(kind, cfg, out_root=out, device=dev, argv=["rftlab", *sys.argv[1:]], fmt=fmt,
                                  progress_factory=factory, processes=processes)
    if folder is None:  # not the main process: it prints the summary and the path
        return
    Console(stderr=True).print(Markdown((folder / "summary.md").read_text()))
    typer.echo(str(folder))


@diagnose_app.command("rewards")
@_user_errors
def diagnose_rewards(
    model: str = typer.Option(None, "--model", "-m", help="Hub name (local cache), save_pretrained folder or "
                              "PEFT adapter folder."),
    prompts: str = typer.Option(None, "--prompts", help="Prompts: .jsonl/.csv/.parquet, datasets folder or name "
                                "(column 'prompt'; strings or chat messages)."),
    reward: str = typer.Option(None, "--reward", "-r", help="Registered reward (bleu, rouge_l_max, ...) or "
                               "'module:function' taking prompts and completions."),
    k: int = typer.Option(None, "-k", "--k", help="Samples per prompt (default 10)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Tokens per completion (default 32)."),
    adapter: str = typer.Option(None, "--adapter", help="PEFT adapter folder to apply to the model."),
    label_budget: float = typer.Option(None, "--label-budget", help="SFT subset: share (< 1) or count of prompts "
                                       "(default 0.01)."),
    overrides: list[str] = typer.Argument(None, help="More settings as key=value (rftlab list shows none: see "
                                          "the module docs, e.g. temperature=0.7 grad_prompts=64)."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Results root; the report goes to "
                             "<out>/diagnose-rewards/<run-id>/."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png or pdf."),
    num_processes: int = typer.Option(1, "--num-processes", help="Processes to split the prompts between (gloo "
                                      "on CPU, one GPU each on CUDA). Or start rftlab under accelerate launch."),
) -> None:
    """Sample K completions per prompt and find the prompts whose reward std, and so RL gradient, vanishes
    (Razin et al. 2024); recommend an SFT subset."""
    _diagnose("rewards", {"model": model, "prompts": prompts, "reward": reward, "k": k,
                          "max_new_tokens": max_new_tokens, "adapter": adapter, "label_budget": label_budget},
              overrides, out, device, fmt, num_processes)


@diagnose_app.command("pairs")
@_user_errors
def diagnose_pairs(
    model: str = typer.Option(None, "--model", "-m", help="Hub name (local cache), save_pretrained folder or "
                              "PEFT adapter folder."),
    pairs: str = typer.Option(None, "--pairs", help="Preference pairs: .jsonl/.csv/.parquet, datasets folder or "
                              "name (columns prompt, chosen, rejected; strings or chat messages)."),
    loss: str = typer.Option(None, "--loss", help="dpo, ipo, slic, rdpo, simpo, dpop, cpo, rpo, rrhf, orpo "
                             "(default dpo)."),
    params: str = typer.Option(None, "--params", help="Parameters the gradients live in: all, last, embeddings, "
                               "lora (default all)."),
    ref: str = typer.Option(None, "--ref", help="Reference model for the loss (default the model itself)."),
    adapter: str = typer.Option(None, "--adapter", help="PEFT adapter folder to apply to the model."),
    max_pairs: int = typer.Option(None, "--max-pairs", help="Diagnose a random subset of N pairs (default all)."),
    overrides: list[str] = typer.Argument(None, help="More settings as key=value, e.g. "
                                          "beta=0.1 (all: rftlab list diagnose-pairs)."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Results root; the report goes to "
                             "<out>/diagnose-pairs/<run-id>/."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png or pdf."),
    num_processes: int = typer.Option(1, "--num-processes", help="Processes to split the pairs between (gloo on "
                                      "CPU, one GPU each on CUDA). Or start rftlab under accelerate launch."),
) -> None:
    """Measure per-pair gradient norms and inner products of chosen and rejected log-probs, and which pairs the
    loss will push the wrong way (Yuan et al. 2024)."""
    _diagnose("pairs", {"model": model, "pairs": pairs, "loss": loss, "params": params, "ref": ref,
                        "adapter": adapter, "max_pairs": max_pairs}, overrides, out, device, fmt, num_processes)


def _check_format(fmt: str) -> None:
    if fmt not in ("png", "pdf"):
        raise RftlabError(f"unknown figure format {fmt!r}: use png or pdf.")


@app.command()
@_user_errors
def plot(
    folder: Path = typer.Argument(..., help="A run folder, or an experiment folder to aggregate seeds."),
    fmt: str = typer.Option("png", "--format", help="Figure format: png or pdf."),
) -> None:
    """Render figures from a run folder (or all complete runs of one experiment) without training."""
    from rftlab import results

    _check_format(fmt)
    runs = results.find_runs(folder)
    selected = select_runs(runs)
    metas = [results.read_json(r / results.CONFIG_FILE) for r in selected]
    spec = _spec_of(metas[0]["experiment"])
    versions = {m["version"] for m in metas} | {spec.version}
    if len(versions) > 1:
        raise RftlabError(
            f"runs in {folder} come from different versions of {spec.name} ({sorted(versions)}); "
            "plot one version at a time."
        )
    out_dir = (folder if len(runs) > 1 or folder not in runs else selected[0]) / "figures"
    for fig in spec.plot(selected, out_dir, fmt):
        typer.echo(str(fig))


def _spec_of(name: str) -> Any:
    """The spec that made a run folder: an experiment, or a ``diagnose-<kind>`` report."""
    from rftlab import diagnose, registry

    kind = name.removeprefix("diagnose-")
    return diagnose.spec(kind) if kind in diagnose.KINDS and kind != name else registry.get(name)


def select_runs(runs: list[Path]) -> list[Path]:
    """From candidate run folders, the complete ones sharing the newest one's config (seed aside).

    A single run folder is returned as is, whatever its status, so a killed run can be inspected.
    """
    from rftlab import results

    if len(runs) == 1:
        return runs
    complete = list(results.iter_complete(runs))
    if not complete:
        raise RftlabError("no complete runs to plot; pass a single run folder to plot a partial run.")

    def key(meta: dict) -> tuple:
        cfg = {k: v for k, v in meta["config"].items() if k != "seed"}
        return meta["experiment"], repr(sorted(cfg.items()))

    newest = key(complete[-1][1])
    chosen = [run for run, meta in complete if key(meta) == newest]
    skipped = len(runs) - len(chosen)
    if skipped:
        typer.echo(f"aggregating {len(chosen)} run(s) with the newest run's config; "
                   f"{skipped} other run(s) skipped", err=True)
    return chosen


@app.command()
@_user_errors
def bench(
    names: list[str] = typer.Argument(None, help="Benchmarks to run (default all): dpo-step, group-rft-step, "
                                      "pair-grad-stats, reward-std, flops."),
    quick: bool = typer.Option(False, "--quick", help="Tiny models, one round: a check of the harness, not a "
                               "measurement."),
    rounds: int = typer.Option(None, "--rounds", help="Timed rounds per benchmark (default 3)."),
    threads: int = typer.Option(2, "--threads", help="torch intra-op threads (0 = torch's default)."),
    no_trl: bool = typer.Option(False, "--no-trl", help="Skip the TRL rows even when trl is installed."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Results root; the run goes to "
                             "<out>/bench/<run-id>/."),
) -> None:
    """Time rftlab's training and sampling loops against TRL and minimal PyTorch loops on the same tiny models
    and data, interleaved; print the table and the run folder's path."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "runner.py").is_file():
        raise RftlabError("rftlab bench runs from a source checkout (the benchmarks/ folder is not installed with "
                          "the package): clone the repository and pip install -e '.[bench]'.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import runner

    folder = runner.run(names or None, quick=quick, rounds=rounds, threads=threads, trl=False if no_trl else None,
                        out=out, echo=typer.echo)
    typer.echo(str(folder))


if __name__ == "__main__":
    app()
