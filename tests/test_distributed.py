"""Data parallelism (rftlab.distributed, rftlab.launch): `grue` and `margin-losses` smoke runs on two CPU processes
(gloo) against one process, the first started by `rftlab run --num-processes 2`, the second by `accelerate launch`;
parameters in sync; a failing process ends the launch with one error line; one process takes the old path without
accelerate.

What must match (see the README's "Scale-out and GPUs"): grue's pretrained-stage statistics exactly (the same
model, each chunk of inputs sampled with its own seed whichever process samples it), its trained stages only
statistically (rollouts are drawn per process, SFT weights tokens per shard); margin-losses to float tolerance
(the same batches, DDP's averaged gradient equals the one-process gradient up to rounding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli_env, rftlab_command, run_rftlab

from rftlab import distributed, launch, results

# 16 inputs per task in chunks of 8: one chunk per process
GRUE = ("run", "grue", "--preset", "smoke", "threads=1", "stats.batch_size=8")
# three of the losses (a reference-anchored one, one with an NLL term, the normalised update), both optimizers
MARGIN = ("run", "margin-losses", "--preset", "smoke", "losses=[dpo,cpo,pairwise-normalized]")


def _run(*args, out: Path, env: dict | None = None, command: list[str] | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*(command or rftlab_command()), *map(str, args), "--out", str(out)], capture_output=True,
                          text=True, env=env or cli_env(), timeout=timeout)


def _folder(proc: subprocess.CompletedProcess) -> Path:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # only the main process prints the run folder
    return Path(lines[0])


@pytest.fixture(scope="module")
def grue_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(one process, two processes). The two-process run goes first: its main process pretrains and caches the
    model while the other waits, then loads it."""
    out = tmp_path_factory.mktemp("grue")
    two = _folder(_run(*GRUE, "--num-processes", "2", out=out))
    one = _folder(_run(*GRUE, out=out))
    return one, two


@pytest.fixture(scope="module")
def margin_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results root of the margin-losses runs (they share its pretrained-model cache)."""
    return tmp_path_factory.mktemp("margin")


@pytest.fixture(scope="module")
def margin_runs(margin_out: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(one process, two processes started by `accelerate launch` with an Accelerate config file). The workers
    find no RFTLAB_RUN_DIR, so the main process makes the run folder and broadcasts its path."""
    config = tmp_path_factory.mktemp("accelerate") / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                      "num_processes: 2\nmixed_precision: 'no'\ngpu_ids: all\n")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                  "--main_process_port", str(launch._free_port()), "-m", "rftlab.cli"]
    two = _folder(_run(*MARGIN, out=margin_out, env={**cli_env(), "OMP_NUM_THREADS": "1"}, command=accelerate))
    one = _folder(_run(*MARGIN, out=margin_out))
    return one, two


def _assert_tables_close(one: pd.DataFrame, two: pd.DataFrame, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """Numbers equal to float tolerance; labels equal where they do not hinge on a sign within that tolerance."""
    assert list(one.columns) == list(two.columns) and len(one) == len(two)
    numeric = [c for c in one.columns if pd.api.types.is_numeric_dtype(one[c]) and one[c].dtype != bool]
    for col in numeric:
        np.testing.assert_allclose(two[col].to_numpy(float), one[col].to_numpy(float), rtol=rtol, atol=atol,
                                   err_msg=col)
    signs = [c for c in ("pred_dw", "pred_dl", "obs_dw", "obs_dl") if c in one]
    clear = (one[signs].abs() > 10 * atol).all(axis=1) if signs else pd.Series(True, index=one.index)
    for col in one.columns.difference(numeric):
        assert (one.loc[clear, col].astype(str) == two.loc[clear, col].astype(str)).all(), col


@dataclasses.dataclass(frozen=True)
class _Demo:
    seed: int = 0


def _meta(run: Path) -> dict:
    return json.loads((run / results.CONFIG_FILE).read_text())


def test_grue_on_two_processes_matches_one(grue_runs: tuple[Path, Path]) -> None:
    one, two = grue_runs
    a, b = results.read_table(one, "inputs"), results.read_table(two, "inputs")
    assert (a[["task", "stage", "input_id"]] == b[["task", "stage", "input_id"]]).all().all()
    pre = (a.stage == "pretrained").to_numpy()
    # the pretrained model's statistics: the same samples, rewards and gradient-norm estimates
    assert all(np.array_equal(x, y) for x, y in zip(a.rewards[pre], b.rewards[pre], strict=True))
    assert (a["sample"][pre] == b["sample"][pre]).all()
    np.testing.assert_array_equal(a.reward_std[pre], b.reward_std[pre])
    np.testing.assert_allclose(b.grad_norm[pre], a.grad_norm[pre], rtol=1e-5, equal_nan=True)
    # trained models: other rollouts, the same statistics within sampling noise
    for (task, stage), part in a[~pre].groupby(["task", "stage"]):
        other = b[(b.task == task) & (b.stage == stage)]
        assert abs(part.reward_mean.mean() - other.reward_mean.mean()) < 0.02, (task, stage)
        assert abs(part.reward_std.mean() - other.reward_std.mean()) < 0.02, (task, stage)
    keys = ["task", "stage", "step"]
    assert (results.read_metrics(one)[keys] == results.read_metrics(two)[keys]).all().all()
    meta = _meta(two)
    assert meta["status"] == "complete" and meta["processes"] == 2
    assert meta["parameter_spread"] == {f"{t}/{s}": 0.0 for t in ("iwslt", "totto") for s in ("rft", "sft", "sft_rft")}
    assert "processes" not in _meta(one) and "parameter_spread" not in _meta(one)
    assert len(list((two / "figures").glob("*.png"))) == 4


def test_margin_losses_on_two_processes_match_one_to_float_tolerance(margin_runs: tuple[Path, Path]) -> None:
    one, two = margin_runs
    assert _meta(two)["processes"] == 2 and _meta(two)["status"] == "complete"
    for table in ("probes", "edit_pairs", "regimes", "metrics"):
        _assert_tables_close(results.read_table(one, table), results.read_table(two, table))
    spread = _meta(two)["parameter_spread"]
    assert set(spread) == {f"{o}/{n}" for o in ("sgd", "adamw") for n in ("dpo", "cpo", "pairwise-normalized")}
    assert set(spread.values()) == {0.0}


DIAGNOSE_TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning",
                  "the sun is warm", "cats and dogs play", "the park is green"] * 10
DIAGNOSE_REWARD = '''
def letter_share(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]
'''


@pytest.fixture(scope="module")
def diagnose_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 saved with save_pretrained, 18 prompts, 12 pairs and a reward module, in one folder."""
    import torch

    from rftlab import models, tokenization
    from rftlab.lm_config import LMConfig

    folder = tmp_path_factory.mktemp("diagnose")
    tokenizer = tokenization.train_bpe_tokenizer(DIAGNOSE_TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = models.build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), tokenizer)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    words = " ".join(DIAGNOSE_TEXTS[:6]).split()  # 24 words
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 2 + i % 3])}) + "\n"
                                                  for i in range(18)))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": " ".join(words[i:i + 2]), "chosen": " ".join(words[i + 2:i + 5 + i % 4]),
         "rejected": " ".join(words[i + 3:i + 5 + i % 3])}) + "\n" for i in range(12)))
    (folder / "reward_for_test.py").write_text(DIAGNOSE_REWARD)
    return folder


@pytest.mark.parametrize("kind", ["rewards", "pairs"])
def test_diagnose_on_two_processes_equals_one(kind: str, diagnose_inputs: Path, tmp_path: Path) -> None:
    """The prompts (pairs) are split between the processes in chunks, chunk c sampled with its own seed: the
    tables equal a one-process run's (rewards and samples exactly)."""
    folder = diagnose_inputs
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    if kind == "rewards":  # 5 chunks of 4 prompts; one chunk of gradient norms, so one process has none
        args = ("diagnose", "rewards", "--model", folder / "model", "--prompts", folder / "prompts.jsonl",
                "--reward", "reward_for_test:letter_share", "-k", "4", "--max-new-tokens", "8", "batch_size=4",
                "grad_prompts=6")
        table, exact, close = "prompts", ["rewards", "reward_mean", "reward_std"], ["grad_norm", "grad_reward_std"]
    else:  # 3 chunks of 4 pairs; the reference log-probs in 2 chunks of 8
        args = ("diagnose", "pairs", "--model", folder / "model", "--pairs", folder / "pairs.jsonl",
                "--ref", folder / "model", "chunk_size=8")
        table, exact = "pairs", ["len_chosen", "len_rejected", "regime"]
        close = ["norm_chosen", "norm_rejected", "inner", "cosine", "logp_chosen", "ref_logp_rejected"]
    one = _folder(_run(*args, out=tmp_path / "one", env=env))
    two = _folder(_run(*args, "--num-processes", "2", out=tmp_path / "two", env=env))
    a, b = results.read_table(one, table), results.read_table(two, table)
    assert len(a) == len(b) == (18 if kind == "rewards" else 12)
    for column in exact:
        assert all(np.array_equal(x, y) for x, y in zip(a[column], b[column], strict=True)), column
    for column in close:
        np.testing.assert_allclose(b[column].to_numpy(float), a[column].to_numpy(float), rtol=1e-5, atol=1e-7,
                                   equal_nan=True, err_msg=column)
    if kind == "rewards":
        assert a.grad_norm.notna().sum() == 6
        pd.testing.assert_frame_equal(results.read_table(one, "samples"), results.read_table(two, "samples"))
        assert (one / "sft_subset.jsonl").read_text() == (two / "sft_subset.jsonl").read_text()
    assert _meta(two)["processes"] == 2 and _meta(two)["status"] == "complete"
    assert (two / "summary.md").is_file() and list((two / "figures").glob("*.png"))


def test_a_failing_process_ends_the_launch_with_one_error_line(margin_runs, margin_out: Path, tmp_path: Path) -> None:
    """Process 1 raises as it waits for process 0 to load the cached model; process 0 then finds it gone."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import rftlab.distributed

            def main_process_first():
                raise RuntimeError("injected failure")

            rftlab.distributed.main_process_first = main_process_first
    """))
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    proc = _run(*MARGIN, "--num-processes", "2", out=margin_out, env=env, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() or "Traceback" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: process 1 of 2 failed"), proc.stderr[-3000:]
    assert "RuntimeError: injected failure" in errors[0]
    (run,) = set((margin_out / "margin-losses").iterdir()) - set(margin_runs)
    assert _meta(run)["status"] == "failed"
    assert "injected failure" in (run / "process-1.log").read_text()
    assert proc.stdout == ""


def test_the_launcher_stops_the_others_when_a_process_crashes(tmp_path: Path, capfd) -> None:
    """A process that dies without a Python error (here: exit status 3): the launcher stops the one still running
    and reports the crash in one line."""
    run = results.create_run(experiment="demo", version=1, preset="p", cfg=_Demo(), out_root=tmp_path, device="cpu",
                             argv=[])
    worker = ("import os, sys, time\nif os.environ['RANK'] == '1':\n    print('dying', file=sys.stderr); sys.exit(3)\n"
              "time.sleep(60)")
    code = launch.spawn(run, 2, [sys.executable, "-c", worker])
    assert code == 3
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: process 1 of 2 failed (exit status 3): dying")
    assert _meta(run.path)["status"] == "failed"


@pytest.mark.parametrize(("args", "message"), [
    (("run", "theorem-bound", "--preset", "smoke", "--num-processes", "2"), "theorem-bound runs on one process only"),
    (("run", "margin-losses", "--preset", "smoke", "--num-processes", "3"),
     "batch_size=8 must be multiple(s) of --num-processes 3"),
    (("run", "grue", "--preset", "smoke", "--num-processes", "2", "rft.batch_prompts=3"), "rft.batch_prompts=3"),
])
def test_runs_that_cannot_be_split_fail_before_making_a_folder(args, message: str, tmp_path: Path) -> None:
    proc = run_rftlab(*args, "--out", tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert message in proc.stderr
    assert not any(tmp_path.iterdir())


def test_cuda_runs_need_a_gpu_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from rftlab import registry

    spec = registry.get("margin-losses")
    cfg = registry.preset_config(spec, "smoke")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.RftlabError, match="--num-processes 2 on CUDA .* torch sees 1"):
        launch.check(spec, cfg, 2, "cuda")
    launch.check(spec, cfg, 2, "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launch.check(spec, cfg, 2, "cuda")


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fsdp_and_deepspeed_configs_are_refused(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(flag, "true")
    with pytest.raises(distributed.RftlabError, match="rftlab trains with DDP only"):
        distributed.init("cuda")


def test_one_process_takes_the_old_path_without_accelerate() -> None:
    script = textwrap.dedent("""
        import sys, torch
        from rftlab import distributed as d
        model = torch.nn.Linear(3, 2)
        state = torch.random.get_rng_state()
        d.seed_per_process(5)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert d.prepare(model) is model and d.parameter_spread(model) == 0.0
        assert d.shard(range(5)) == [0, 1, 2, 3, 4] and d.gather([1, 2]) == [1, 2] and d.broadcast("x") == "x"
        assert d.mean({"a": 1.5}) == {"a": 1.5} and d.rank() == 0 and d.is_main() and d.device("cpu") == "cpu"
        with d.main_process_first(), d.no_sync(model):
            d.barrier()
        assert "accelerate" not in sys.modules and not torch.distributed.is_initialized()
    """)
    env = {k: v for k, v in cli_env().items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_chunk_seeds_and_shard_sizes() -> None:
    assert distributed.chunk_seed(7, 0) == 7  # chunk 0 keeps the one-process seed
    seeds = {distributed.chunk_seed(s, c) for s in range(3) for c in range(1, 50)}
    assert len(seeds) == 3 * 49  # independent of one another
    distributed.require_multiples(2, {"a": 4, "b": 8})
    distributed.require_multiples(1, {"a": 3})
    with pytest.raises(distributed.RftlabError, match="a=3 must be"):
        distributed.require_multiples(2, {"a": 3, "b": 8})
