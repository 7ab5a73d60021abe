"""grue (Razin et al. 2024, §4.1): the smoke preset end to end, table invariants, exact resume, paper-scale paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_killed_then_resumed

from rftlab import registry, results
from rftlab.errors import RftlabError
from rftlab.experiments import grue


def smoke_config(*overrides: str):
    spec = registry.get("grue")
    return spec, registry.preset_config(spec, "smoke", list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    spec, cfg = smoke_config()
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path_factory.mktemp("grue"))
    grue.run(cfg, run)
    run.finish("complete")
    return run.path


def test_inputs_table_holds_every_task_stage_and_input(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    _, cfg = smoke_config()
    assert len(inputs) == len(cfg.tasks.names) * len(grue.STAGES) * cfg.tasks.n_stats
    rewards = np.stack(inputs.rewards.to_numpy())
    assert rewards.shape[1] == cfg.stats.k
    np.testing.assert_allclose(inputs.reward_mean, rewards.mean(1))
    np.testing.assert_allclose(inputs.reward_std, rewards.std(1))  # population std over the K samples
    assert ((rewards >= 0) & (rewards <= 1)).all()
    grads = inputs[inputs.stage == "pretrained"].grad_norm
    assert grads.notna().sum() == len(cfg.tasks.names) * cfg.tasks.n_grad and (grads.dropna() >= 0).all()


def test_summary_is_consistent_with_the_inputs(smoke: Path) -> None:
    inputs = results.read_table(smoke, "inputs")
    summary = results.read_table(smoke, "summary").set_index("task")
    for task, part in inputs.groupby("task"):
        pre = part[part.stage == "pretrained"].set_index("input_id")
        sft = part[part.stage == "sft"].set_index("input_id")
        assert summary.loc[task, "frac_small_std"] == pytest.approx((pre.reward_std < grue.SMALL_STD).mean())
        assert summary.loc[task, "gain_sft"] == pytest.approx((sft.reward_mean - pre.reward_mean).mean())
        assert summary.loc[task, "std_p10"] == pytest.approx(pre.reward_std.quantile(0.1))


def test_metrics_use_trl_names(smoke: Path) -> None:
    metrics = results.read_metrics(smoke)
    rft = metrics[metrics.stage == "rft"]
    for column in ("reward/mean", "reward/std", "frac_reward_zero_std", "kl", "entropy", "policy/clipfrac",
                   "loss/policy", "loss/value"):
        assert rft[column].notna().all(), column
    assert metrics[metrics.stage == "sft"]["loss/sft"].notna().all()


def test_a_run_killed_between_stages_resumes_to_the_same_tables(smoke: Path) -> None:
    spec, cfg = smoke_config()
    # killed after iwslt/sft; shares the smoke run's cached pretrained model
    path = run_killed_then_resumed(spec, cfg, smoke.parent.parent, kill_after=3)
    pd.testing.assert_frame_equal(results.read_table(path, "inputs"), results.read_table(smoke, "inputs"))
    pd.testing.assert_frame_equal(results.read_metrics(path), results.read_metrics(smoke))


def test_real_data_without_files_names_what_to_download(tmp_path: Path) -> None:
    spec, cfg = smoke_config("tasks.source=real", f"tasks.data_dir={tmp_path}")
    with pytest.raises(RftlabError, match="load_dataset"):
        grue.run(cfg, spec.new_run(cfg, preset="smoke", out_root=tmp_path / "out"))


def test_a_model_saved_with_save_pretrained_is_loaded_by_path(tmp_path: Path) -> None:
    """The paper-scale path (model.name_or_path) on a tiny GPT-2 and tokenizer saved locally."""
    from rftlab import models, tokenization
    from rftlab.data import grue_tasks
    from rftlab.lm_config import LMConfig

    task = grue_tasks.make_task("totto", n_train=20, n_val=2, n_test=2)
    tokenizer = tokenization.train_bpe_tokenizer(task.pretrain_texts(200), vocab_size=400)
    model = models.build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=160), tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    spec, cfg = smoke_config(f"model.name_or_path={tmp_path / 'tiny'}", "tasks.names=[totto]", "tasks.n_train=20",
                             "tasks.n_stats=8", "tasks.n_grad=2")
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path / "out")
    grue.run(cfg, run)
    inputs = results.read_table(run.path, "inputs")
    assert set(inputs.stage) == set(grue.STAGES) and len(inputs) == 4 * 8
    assert not (run.path.parent.parent / "_cache").exists()  # no pretraining stage for a loaded model


def test_lora_finetunes_adapters_only(tmp_path: Path) -> None:
    """model.lora_r > 0: every stage trains LoRA adapters; the pretrained weights stay as they were."""
    pytest.importorskip("peft", reason="LoRA needs peft")
    import torch

    spec, cfg = smoke_config("model.lora_r=2", "tasks.names=[totto]")
    run = spec.new_run(cfg, preset="smoke", out_root=tmp_path)
    grue.run(cfg, run)
    sft = torch.load(run.path / "checkpoints" / "totto-sft.pt", weights_only=True)
    adapters = [k for k in sft if "lora_" in k]
    assert adapters and all(k.endswith(".weight") for k in adapters)
    cache = next((tmp_path / "_cache").iterdir())
    base = torch.load(cache / "model.pt", weights_only=True)
    for key, value in base.items():  # peft names the frozen weights base_model.model.<name>(.base_layer)
        module, _, leaf = key.rpartition(".")
        match = [k for k in sft if k.endswith(key) or k.endswith(f"{module}.base_layer.{leaf}")]
        assert match, key
        torch.testing.assert_close(sft[match[0]], value)
    changed = [k for k in adapters if "lora_B" in k and sft[k].abs().max() > 0]
    assert changed  # B starts at zero; SFT moved it
