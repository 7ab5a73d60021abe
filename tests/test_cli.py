"""The ``rftlab`` command end to end: start-up time, list, run, plot, determinism, resume after SIGKILL,
and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from rftlab import config, registry, results
from rftlab.cli import app
from rftlab.experiments import theorem_bound

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args: str | Path) -> tuple[int, str, str]:
    """Run the CLI in this process (fast: torch is already imported); (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# --- start-up time and list ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["list"]])
def test_help_and_list_start_fast(args: list[str], rftlab_argv: list[str], rftlab_env: dict) -> None:
    """Measured here on 2 cores: about 0.2 s each. Best of three, to ride out a noisy machine."""
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([*rftlab_argv, *args], capture_output=True, text=True, env=rftlab_env,
                              timeout=30)
        timings.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
    assert min(timings) < 1.5, timings
    assert ("theorem-bound" if args == ["list"] else "Run an experiment") in proc.stdout


def test_list_shows_experiments_and_presets(rftlab: Callable) -> None:
    proc = rftlab("list")
    row = next(line for line in proc.stdout.splitlines() if "theorem-bound" in line)
    assert "Razin et al. 2024" in row and "default, smoke" in row and "~15 s" in row


def test_list_one_experiment_shows_keys_types_and_metrics(rftlab: Callable) -> None:
    proc = rftlab("list", "theorem-bound")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
             for line in out.splitlines() if line.count("│") == 5}
    assert cells["vocab_size"] == ["int", "4", "|V|, the policy's vocabulary"]
    assert cells["output_lens"][:2] == ["tuple[int, ...]", "(1, 2, 3, 4)"]  # brackets are not rich markup
    assert cells["lr"][:2] == ["float", "0.03"]
    assert set(config.dotted_fields(theorem_bound.Config)) <= set(cells)
    for metric in theorem_bound.METRICS:
        assert metric in out
    assert "Presets: default, smoke" in out
    assert "Rewards are uniform in [-1, 1]" in " ".join(out.split())  # the module docstring


# --- run -----------------------------------------------------------------------------------------


def test_run_smoke_prints_folder_last_and_writes_a_complete_run(smoke_run: Path) -> None:
    # the fixture asserted exit 0 and took the folder from the last stdout line
    assert smoke_run.parent.name == "theorem-bound"
    meta = json.loads((smoke_run / "config.json").read_text())
    assert meta["status"] == "complete" and meta["experiment"] == "theorem-bound" and meta["version"] == 1
    assert meta["preset"] == "smoke" and meta["device"] == "cpu" and meta["finished"] is not None
    smoke = config.read_toml(registry.presets_dir() / "theorem-bound" / "smoke.toml")
    assert {k: meta["config"][k] for k in smoke} == smoke
    assert meta["run_id"] == smoke_run.name and smoke_run.name.split("-")[2] == "smoke"
    assert smoke_run.name.endswith(config.config_hash(theorem_bound.Config(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in smoke.items()})))
    names = {p.name for p in smoke_run.iterdir()}
    assert {"config.json", "metrics.parquet", "inputs.parquet", "figures", "log.txt"} <= names
    assert "metrics.jsonl" not in names and not [n for n in names if n.startswith(".")]
    figure = smoke_run / "figures" / "theorem_bound.png"
    assert figure.read_bytes()[:8] == PNG_MAGIC and figure.stat().st_size > 10_000
    assert len(results.read_table(smoke_run, "metrics")) == 2
    assert len(results.read_table(smoke_run, "inputs")) == 48


def test_run_stdout_is_only_the_folder(tmp_path: Path) -> None:
    code, out, err = invoke("run", "theorem-bound", "--preset", "smoke", "--out", tmp_path,
                            "snapshot_steps=[0]", "temperatures=[1.0]")
    assert code == 0, err
    (folder,) = (tmp_path / "theorem-bound").iterdir()
    assert out.splitlines() == [str(folder)]
    assert f"run folder {folder}" in err and "figure: " in err


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    def run(seed: int, out: str) -> pd.DataFrame:
        code, stdout, stderr = invoke("run", "theorem-bound", "--preset", "smoke", "--seed", str(seed),
                                      "--out", tmp_path / out)
        assert code == 0, stderr
        folder = Path(stdout.splitlines()[-1])
        assert json.loads((folder / "config.json").read_text())["seed"] == seed
        return results.read_table(folder, "inputs")

    first, second = run(3, "a"), run(3, "b")
    pd.testing.assert_frame_equal(first, second)  # bit for bit
    other = run(4, "c")
    assert not first.reward_mean.equals(other.reward_mean)


def test_config_layers_preset_then_file_then_set(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text("n_inputs = 3\nhidden = 16\nsnapshot_steps = [0]\ntemperatures = [1.0]\n")
    code, out, err = invoke("run", "theorem-bound", "--preset", "smoke", "--config", user, "--set", "hidden=8",
                            "--out", tmp_path / "results")
    assert code == 0, err
    folder = Path(out.splitlines()[-1])
    saved = json.loads((folder / "config.json").read_text())["config"]
    assert saved["output_lens"] == [1, 2]  # from the preset
    assert saved["n_inputs"] == 3 and saved["snapshot_steps"] == [0]  # from the file
    assert saved["hidden"] == 8  # from --set
    assert saved["vocab_size"] == 4  # the dataclass default
    assert len(results.read_table(folder, "inputs")) == 2 * 1 * 1 * 3


# --- plot ----------------------------------------------------------------------------------------


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("plot must not train")

    monkeypatch.setattr(theorem_bound, "run", forbidden)


def test_plot_run_folder_rerenders_without_training(copy_of_smoke_run: Path, no_training: None) -> None:
    run = copy_of_smoke_run
    shutil.rmtree(run / "figures")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out, err = invoke("plot", run)
    assert code == 0, err
    assert out.splitlines() == [str(run / "figures" / "theorem_bound.png")]
    assert (run / "figures" / "theorem_bound.png").read_bytes()[:8] == PNG_MAGIC
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # data untouched
    code, out, err = invoke("plot", run, "--format", "pdf")
    assert code == 0, err
    assert (run / "figures" / "theorem_bound.pdf").read_bytes()[:5] == b"%PDF-"


def test_plot_experiment_folder_aggregates_matching_runs(copy_of_smoke_run: Path, no_training: None) -> None:
    experiment_dir = copy_of_smoke_run.parent

    def clone(suffix: str, **changes: object) -> Path:
        target = experiment_dir / f"{copy_of_smoke_run.name}-{suffix}"
        shutil.copytree(copy_of_smoke_run, target)
        meta = json.loads((target / "config.json").read_text())
        meta["config"].update(changes)
        (target / "config.json").write_text(json.dumps(meta))
        return target

    clone("seed1", seed=1)  # same config apart from the seed: aggregated
    clone("other", n_inputs=9)  # a different config, older than the newest: skipped
    code, out, err = invoke("plot", experiment_dir)
    assert code == 0, err
    assert out.splitlines() == [str(experiment_dir / "figures" / "theorem_bound.png")]
    assert (experiment_dir / "figures" / "theorem_bound.png").read_bytes()[:8] == PNG_MAGIC
    assert "aggregating 2 run(s) with the newest run's config; 1 other run(s) skipped" in err


def test_plot_refuses_to_mix_versions(copy_of_smoke_run: Path) -> None:
    other = copy_of_smoke_run.parent / f"{copy_of_smoke_run.name}-old"
    shutil.copytree(copy_of_smoke_run, other)
    meta = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**meta, "version": 0}))
    code, out, err = invoke("plot", copy_of_smoke_run.parent)
    assert code == 2 and out == ""
    assert err.startswith("error: runs in ") and "different versions of theorem-bound ([0, 1])" in err


# --- resume after SIGKILL ------------------------------------------------------------------------

# Length 1 finishes (row logged, checkpoint saved) in about a second; length 3 then takes a few more.
SLOW_WORDS = ["output_lens=[1,3]", "snapshot_steps=[0,600]", "temperatures=[1.0]"]


def test_sigkill_keeps_rows_and_resume_completes_without_duplicates(
    tmp_path: Path, rftlab: Callable, rftlab_argv: list[str], rftlab_env: dict
) -> None:
    out = tmp_path / "results"
    log = (tmp_path / "stdout.txt").open("w")
    proc = subprocess.Popen(
        [*rftlab_argv, "run", "theorem-bound", "--preset", "smoke", "--out", str(out), *SLOW_WORDS],
        stdout=log, stderr=subprocess.DEVNULL, env=rftlab_env,
    )
    try:
        deadline = time.monotonic() + 90
        folder = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list((out / "theorem-bound").glob("*")) if (out / "theorem-bound").exists() else []
            if runs and (runs[0] / results.CHECKPOINT_FILE).exists():
                folder = runs[0]
                break
            time.sleep(0.02)
        assert folder is not None and proc.poll() is None, "the run ended before it could be killed"
        proc.kill()  # SIGKILL: no handler, no finish()
        assert proc.wait(timeout=30) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    meta = json.loads((folder / "config.json").read_text())
    assert meta["status"] == "running"  # nobody got to write the end status
    assert not (folder / "metrics.parquet").exists() and not (folder / "inputs.parquet").exists()
    killed_rows = results.read_metrics(folder)
    assert killed_rows.output_len.tolist() == [1]
    assert killed_rows.n_points.tolist() == [2 * 1 * 6]

    partial = rftlab("plot", folder)  # a killed run can be inspected: a clear error, not a traceback
    assert_one_line_error(partial, "inputs.parquet is missing: the run did not write it")

    resumed = rftlab("run", "theorem-bound", "--resume", folder)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(folder)
    assert "resuming after output lengths [1]" in resumed.stderr
    meta = json.loads((folder / "config.json").read_text())
    assert meta["status"] == "complete" and len(meta["resumed"]) == 1
    assert not (folder / results.JOURNAL_FILE).exists()
    metrics = results.read_metrics(folder)
    assert metrics.output_len.tolist() == [1, 3]  # exactly one row per length: nothing lost, nothing twice
    pd.testing.assert_frame_equal(metrics.iloc[:1], killed_rows)
    assert (folder / "figures" / "theorem_bound.png").exists()

    # the same numbers as a run that was never interrupted
    smoke = registry.presets_dir() / "theorem-bound" / "smoke.toml"
    cfg = config.resolve(theorem_bound.Config, [("smoke", config.read_toml(smoke))], SLOW_WORDS)
    reference = results.create_run(experiment="theorem-bound", version=1, preset="smoke", cfg=cfg,
                                   out_root=tmp_path / "reference", device="cpu", argv=[])
    theorem_bound.run(cfg, reference)
    reference.finish("complete")
    pd.testing.assert_frame_equal(results.read_table(folder, "inputs"), results.read_table(reference.path, "inputs"))
    pd.testing.assert_frame_equal(metrics, results.read_metrics(reference.path))


# --- one-line errors -----------------------------------------------------------------------------

BAD_RUNS = {
    "unknown experiment": (["run", "theorem-bond"],
                           "error: unknown experiment 'theorem-bond'. Did you mean 'theorem-bound'? "
                           "Run `rftlab list` to see all experiments."),
    "unknown experiment in list": (["list", "theorem-bond"], "Did you mean 'theorem-bound'?"),
    "unknown override key": (["run", "theorem-bound", "--preset", "smoke", "n_input=3"],
                             "error: unknown config key 'n_input' in --set. Did you mean n_inputs? "
                             "`rftlab list <experiment>` shows every key."),
    "wrong type": (["run", "theorem-bound", "--set", "n_inputs=many"],
                   "error: bad value 'many' for n_inputs: expected int."),
    "wrong item type": (["run", "theorem-bound", "temperatures=[1,hot]"],
                        "error: bad value [1, 'hot'] for temperatures: expected tuple[float, ...]."),
    "invalid value": (["run", "theorem-bound", "vocab_size=1"],
                      "error: invalid config: vocab_size must be ≥ 2 and every output length in 1..6"),
    "bad preset": (["run", "theorem-bound", "--preset", "smok"],
                   "error: experiment 'theorem-bound' has no preset 'smok' (presets: default, smoke)."),
    "cuda unavailable": (["run", "theorem-bound", "--preset", "smoke", "--device", "cuda"],
                         "requested but torch"),
    "unknown device": (["run", "theorem-bound", "--device", "tpu"],
                       "error: unknown device 'tpu': use auto, cpu or cuda."),
    "bad format": (["run", "theorem-bound", "--preset", "smoke", "--format", "jpg"],
                   "error: unknown figure format 'jpg': use png or pdf."),
    "missing config file": (["run", "theorem-bound", "--config", "no/such.toml"],
                            "error: config file no/such.toml does not exist."),
    "malformed word": (["run", "theorem-bound", "lr0.1"],
                       "error: override 'lr0.1' is not of the form key=value (e.g. lr=1e-3)."),
    "missing resume folder": (["run", "theorem-bound", "--resume", "no/such/run"],
                              "error: no/such/run/config.json does not exist: is no/such/run a run folder?"),
    "missing plot folder": (["plot", "no/such/run"],
                            "error: no/such/run does not exist; pass a run folder or an experiment folder."),
    "bad plot format": (["plot", "no/such/run", "--format", "svg"],
                        "error: unknown figure format 'svg': use png or pdf."),
    "unknown precision": (["run", "theorem-bound", "--precision", "fp16"],
                          "error: unknown precision 'fp16': use auto, fp32, bf16."),
    "bf16 where training is fp32 only": (
        ["run", "theorem-bound", "--precision", "bf16"],
        "error: theorem-bound trains in fp32 without torch.compile; --precision bf16 and --compile apply to: "),
    "compile where training is fp32 only": (["run", "controlled", "--compile"],
                                            "error: controlled trains in fp32 without torch.compile"),
    "grue real data missing": (["run", "grue", "--preset", "smoke", "tasks.source=real", "tasks.data_dir=no/data"],
                               "error: GRUE data set 'iwslt' not found at no/data/"),
    "rft-mitigations real data missing": (
        ["run", "rft-mitigations", "--preset", "smoke", "tasks.source=real", "tasks.data_dir=no/data"],
        "error: GRUE data set"),
    "grue model folder missing": (["run", "grue", "--preset", "smoke", "model.name_or_path=./no-model"],
                                  "error: model.name_or_path './no-model' is not a folder"),
}


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    if expected.startswith("error: "):
        assert lines[0].startswith(expected)
    else:
        assert expected in lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_is_one_error_line_and_leaves_no_run_folder(
    case: str, tmp_path: Path, rftlab: Callable
) -> None:
    args, expected = BAD_RUNS[case]
    out = tmp_path / "results"
    extra = ["--out", str(out)] if args[0] == "run" else []
    proc = rftlab(*args, *extra, cwd=tmp_path)
    if case == "cuda unavailable" and proc.returncode == 0:
        pytest.skip("this machine has CUDA")
    assert_one_line_error(proc, expected)
    assert not out.exists()  # rejected before any run folder was made


@pytest.mark.parametrize("args", [["run", "theorem-bound", "--preset", "smoke"],
                                  ["diagnose", "rewards", "--model", "m", "--prompts", "p.jsonl", "--reward", "bleu"]])
def test_a_transformers_that_cannot_use_this_torch_is_one_error_line(args: list[str], tmp_path: Path,
                                                                    monkeypatch) -> None:
    """transformers 5 beside torch < 2.6 switches its PyTorch support off; say so before anything runs."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    out = tmp_path / "results"
    code, stdout, stderr = invoke(*args, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error: transformers ")
    assert "pip install 'transformers<5'" in stderr
    assert not out.exists()


def test_corrupt_parquet_for_plot(copy_of_smoke_run: Path, rftlab: Callable) -> None:
    (copy_of_smoke_run / "inputs.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    proc = rftlab("plot", copy_of_smoke_run)
    assert_one_line_error(
        proc, f"error: {copy_of_smoke_run / 'inputs.parquet'} is corrupt (unreadable parquet); re-run the experiment.")


def test_corrupt_config_json_for_plot(copy_of_smoke_run: Path, rftlab: Callable) -> None:
    (copy_of_smoke_run / "config.json").write_text('{"experiment": "theorem-bo')
    assert_one_line_error(rftlab("plot", copy_of_smoke_run), "config.json is corrupt (not JSON)")


def test_resume_of_a_complete_run(copy_of_smoke_run: Path, rftlab: Callable) -> None:
    before = (copy_of_smoke_run / "config.json").read_text()
    proc = rftlab("run", "theorem-bound", "--resume", copy_of_smoke_run)
    assert_one_line_error(proc, f"error: run {copy_of_smoke_run} is already complete; nothing to resume.")
    assert (copy_of_smoke_run / "config.json").read_text() == before


def test_resume_with_changed_config_or_other_experiment(copy_of_smoke_run: Path) -> None:
    meta = json.loads((copy_of_smoke_run / "config.json").read_text())
    (copy_of_smoke_run / "config.json").write_text(json.dumps({**meta, "status": "running"}))
    code, out, err = invoke("run", "theorem-bound", "--resume", copy_of_smoke_run, "n_inputs=7")
    assert code == 2 and err == (f"error: --resume continues {copy_of_smoke_run} with its saved config; "
                                 "drop the overrides (n_inputs=7) or start a new run.\n")
    (copy_of_smoke_run / "config.json").write_text(json.dumps({**meta, "experiment": "controlled"}))
    code, out, err = invoke("run", "theorem-bound", "--resume", copy_of_smoke_run)
    assert code == 2 and err == f"error: {copy_of_smoke_run} is a run of 'controlled', not 'theorem-bound'.\n"


def test_invalid_toml_config_file(tmp_path: Path, rftlab: Callable) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("n_inputs = = 3\n")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("n_input = 3\n")
    out = tmp_path / "results"
    line = assert_one_line_error(rftlab("run", "theorem-bound", "--config", bad, "--out", out),
                                 f"error: config file {bad} is not valid TOML")
    assert line.endswith(".")
    assert_one_line_error(rftlab("run", "theorem-bound", "--config", unknown, "--out", out),
                          f"error: unknown config key 'n_input' in {unknown}. Did you mean n_inputs?")
    assert not out.exists()


def test_resume_with_a_corrupt_checkpoint(copy_of_smoke_run: Path, rftlab: Callable) -> None:
    meta = json.loads((copy_of_smoke_run / "config.json").read_text())
    (copy_of_smoke_run / "config.json").write_text(json.dumps({**meta, "status": "running"}))
    (copy_of_smoke_run / "checkpoints").mkdir(exist_ok=True)
    (copy_of_smoke_run / results.CHECKPOINT_FILE).write_bytes(b"half a checkpoint")
    before = (copy_of_smoke_run / "config.json").read_text()
    proc = rftlab("run", "theorem-bound", "--resume", copy_of_smoke_run)
    line = assert_one_line_error(
        proc, f"error: checkpoint {copy_of_smoke_run / results.CHECKPOINT_FILE} is unreadable (")
    assert line.endswith("); start a new run.")
    assert (copy_of_smoke_run / "config.json").read_text() == before
