"""Run folders: provenance, the metrics journal, compaction, checkpoints and resume, atomic tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rftlab import config, results
from rftlab.errors import RftlabError


@dataclass(frozen=True)
class TinyConfig:
    steps: int = 3  # steps
    seed: int = 7  # seed


def new_run(root: Path, preset: str = "smoke", cfg: TinyConfig | None = None) -> results.Run:
    return results.create_run(experiment="tiny", version=2, preset=preset, cfg=cfg or TinyConfig(),
                              out_root=root, device="cpu", argv=["rftlab", "run", "tiny"])


def journal_lines(run: results.Run) -> list[str]:
    return (run.path / results.JOURNAL_FILE).read_text().splitlines()


def test_create_run_writes_provenance(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    cfg_hash = config.config_hash(TinyConfig())
    assert run.path.parent == tmp_path / "tiny"
    assert run.path.name.endswith(f"-smoke-{cfg_hash}")
    meta = json.loads((run.path / results.CONFIG_FILE).read_text())
    assert meta["experiment"] == "tiny" and meta["version"] == 2 and meta["preset"] == "smoke"
    assert meta["status"] == "running" and meta["finished"] is None
    assert meta["config"] == {"steps": 3, "seed": 7} and meta["seed"] == 7
    assert meta["run_id"] == run.path.name and meta["argv"] == ["rftlab", "run", "tiny"]
    assert meta["packages"]["torch"] == torch.__version__
    assert set(meta["git"]) == {"sha", "dirty"}
    second = new_run(tmp_path)  # same second, same config: a distinct folder
    assert second.path != run.path and second.path.exists()


def test_journal_rows_survive_and_scalars_become_plain(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    run.log(step=0, loss=np.float32(0.5))
    run.log({"step": 1, "loss": torch.tensor(0.25)}, stage="rft")
    run.log(step=2, loss=0.125)
    assert [json.loads(line) for line in journal_lines(run)] == [
        {"step": 0, "loss": 0.5}, {"step": 1, "loss": 0.25, "stage": "rft"}, {"step": 2, "loss": 0.125}]
    # a reader in another process (a new handle) sees every row while the run is live
    frame = results.read_metrics(run.path)
    assert frame.step.tolist() == [0, 1, 2]
    assert frame.loss.tolist() == [0.5, 0.25, 0.125]


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    for step in range(3):
        run.log(step=step, loss=1.0 / (step + 1))
    with open(run.path / results.JOURNAL_FILE, "a") as fh:
        fh.write('{"step": 3, "lo')  # SIGKILL in the middle of a write
    frame = results.read_metrics(run.path)
    assert frame.step.tolist() == [0, 1, 2]


def test_finish_complete_compacts_and_removes_journal(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    for step in range(4):
        run.log(step=step, value=step * 2.0)
    run.finish("complete")
    assert not (run.path / results.JOURNAL_FILE).exists()
    assert (run.path / results.METRICS_FILE).exists()
    stored = pd.read_parquet(run.path / results.METRICS_FILE)
    assert stored.to_dict("list") == {"step": [0, 1, 2, 3], "value": [0.0, 2.0, 4.0, 6.0]}
    pd.testing.assert_frame_equal(results.read_metrics(run.path), stored)
    meta = results.read_json(run.path / results.CONFIG_FILE)
    assert meta["status"] == "complete" and meta["finished"] is not None
    assert not [p.name for p in run.path.iterdir() if p.name.startswith(".")]  # no temp files


def test_finish_failed_keeps_journal_for_resume(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    run.log(step=0)
    run.finish("failed")
    assert (run.path / results.JOURNAL_FILE).exists()
    assert pd.read_parquet(run.path / results.METRICS_FILE).step.tolist() == [0]
    assert results.read_json(run.path / results.CONFIG_FILE)["status"] == "failed"


def test_checkpoint_round_trip_truncates_journal_to_covered_rows(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    for step in range(3):
        run.log(step=step)
    weights = torch.arange(6, dtype=torch.float32).view(2, 3)
    run.save_checkpoint({"weights": weights, "step": 3, "history": [0.5, 0.25]})
    run.log(step=3)
    run.log(step=4)  # logged after the checkpoint: replayed by a resumed run, so dropped on load

    resumed = results.Run(run.path, run.meta)  # a new process opening the same folder
    state = resumed.load_checkpoint()
    assert state["step"] == 3 and state["history"] == [0.5, 0.25]
    torch.testing.assert_close(state["weights"], weights)
    assert results.read_metrics(run.path).step.tolist() == [0, 1, 2]
    resumed.log(step=3)
    resumed.log(step=4)
    resumed.save_checkpoint({"step": 5})
    assert torch.load(run.path / results.CHECKPOINT_FILE, weights_only=True)["metrics_rows"] == 5
    resumed.finish("complete")
    assert results.read_metrics(run.path).step.tolist() == [0, 1, 2, 3, 4]  # no duplicates


def test_load_checkpoint_without_checkpoint_restarts_the_journal(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    run.log(step=0)
    assert results.Run(run.path, run.meta).load_checkpoint() is None
    assert journal_lines(run) == []


def test_reopen_run_truncates_journal_even_if_the_experiment_never_loads(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    run.log(step=0)
    run.log(step=1)
    run.save_checkpoint({"step": 2})
    run.log(step=2)
    with open(run.path / results.JOURNAL_FILE, "a") as fh:
        fh.write('{"step": 3, "lo')  # torn by SIGKILL
    reopened = results.reopen_run(run.path, ["rftlab", "run", "tiny", "--resume", str(run.path)])
    assert journal_lines(reopened) == ['{"step": 0}', '{"step": 1}']
    reopened.log(step=2)  # appended on a fresh line, not glued to the torn one
    reopened.finish("complete")
    assert results.read_metrics(run.path).step.tolist() == [0, 1, 2]
    meta = results.read_json(run.path / results.CONFIG_FILE)
    assert meta["status"] == "complete" and len(meta["resumed"]) == 1
    assert meta["resumed"][0]["argv"][-2:] == ["--resume", str(run.path)]


def test_reopen_complete_run_fails(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    run.finish("complete")
    with pytest.raises(RftlabError, match="already complete; nothing to resume"):
        results.reopen_run(run.path, [])


def test_unreadable_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    (run.path / "checkpoints").mkdir()
    (run.path / results.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(RftlabError, match=r"last\.pt is unreadable .*start a new run\.") as info:
        run.load_checkpoint()
    assert "\n" not in str(info.value)
    with pytest.raises(RftlabError, match="unreadable"):
        results.reopen_run(run.path, [])
    assert results.read_json(run.path / results.CONFIG_FILE).get("resumed") is None  # left untouched


def test_write_table_is_atomic_and_round_trips(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    frame = pd.DataFrame({"input": [0, 1, 2], "reward_std": np.array([0.1, 0.0, 0.5], dtype=np.float32)})
    path = run.write_table("inputs", frame)
    assert path == run.path / "inputs.parquet"
    pd.testing.assert_frame_equal(results.read_table(run.path, "inputs"), frame)
    assert not [p.name for p in run.path.iterdir() if p.name.startswith(".")]

    class Exploding:
        """A frame whose writer dies halfway: the old table must survive, no temp file may stay."""

        def to_parquet(self, target: Path, index: bool) -> None:
            Path(target).write_bytes(b"PAR1 half a file")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.write_table("inputs", Exploding())
    pd.testing.assert_frame_equal(results.read_table(run.path, "inputs"), frame)
    assert not [p.name for p in run.path.iterdir() if p.name.startswith(".")]


def test_read_table_missing_or_corrupt(tmp_path: Path) -> None:
    run = new_run(tmp_path)
    with pytest.raises(RftlabError, match=r"inputs\.parquet is missing"):
        results.read_table(run.path, "inputs")
    (run.path / "inputs.parquet").write_bytes(b"PAR1 garbage PAR1")
    with pytest.raises(RftlabError) as info:
        results.read_table(run.path, "inputs")
    assert str(info.value) == f"{run.path / 'inputs.parquet'} is corrupt (unreadable parquet); re-run the experiment."


def test_read_json_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(RftlabError, match="does not exist: is .* a run folder"):
        results.read_json(tmp_path / results.CONFIG_FILE)
    (tmp_path / results.CONFIG_FILE).write_text("{not json")
    with pytest.raises(RftlabError, match="is corrupt"):
        results.read_json(tmp_path / results.CONFIG_FILE)


def test_find_runs_and_complete_runs(tmp_path: Path) -> None:
    first, second = new_run(tmp_path), new_run(tmp_path, preset="default")
    first.finish("complete")
    experiment_dir = tmp_path / "tiny"
    assert results.find_runs(first.path) == [first.path]
    assert results.find_runs(experiment_dir) == sorted([first.path, second.path])
    assert [run for run, _ in results.iter_complete(results.find_runs(experiment_dir))] == [first.path]
    with pytest.raises(RftlabError, match="does not exist"):
        results.find_runs(tmp_path / "nope")
    with pytest.raises(RftlabError, match="holds no run folders"):
        results.find_runs(tmp_path)  # the results root: experiment folders, not runs
