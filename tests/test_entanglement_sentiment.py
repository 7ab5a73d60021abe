"""entanglement-sentiment (Yuan et al. 2024, Fig. 4): the smoke preset runs end to end through the CLI and writes
the curves, per-pair statistics, heatmaps and summary; shared suffixes entangle the gradients (cosine and the
heatmap diagonal); the paper path runs on a local GPT-2 stand-in with local data files; bad input fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_killed_then_resumed, run_rftlab

from rftlab import results
from rftlab.data import sentiment

VARIANTS = ["label", "short-suffix", "long-suffix"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("entanglement-sentiment")
    proc = run_rftlab("run", "entanglement-sentiment", "--preset", "smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.is_dir(), proc.stdout
    return folder


def test_tables_and_figures(smoke: Path) -> None:
    metrics = results.read_metrics(smoke)
    assert list(dict.fromkeys(metrics.variant)) == VARIANTS
    assert sorted(set(metrics.step)) == [0, 3, 6]  # eval_every 3, 6 DPO steps
    for col in ("logps/chosen", "logps/rejected", "logps/chosen_per_token", "rewards/margins", "grad/cosine",
                "grad/inner", "regime/frac_chosen_down", "regime/frac_rejected_up"):
        assert metrics[col].notna().all(), col
    start = metrics[metrics.step == 0]
    assert np.allclose(start["rewards/margins"], 0, atol=1e-5)  # the reference is the SFT'd policy itself
    per_token = metrics["logps/chosen"] / metrics["logps/chosen_per_token"]
    assert (per_token[metrics.variant == "label"].round(6) == 1).all()  # one-token responses
    pairs = results.read_table(smoke, "pairs")
    assert len(pairs) == 3 * 3 * 4  # variants × statistics steps (0, 3, 6) × n_stats
    assert np.allclose(pairs.inner, pairs.cosine * pairs.norm_chosen * pairs.norm_rejected, rtol=1e-6)
    summary = results.read_table(smoke, "summary")
    assert list(summary.variant) == VARIANTS
    assert np.allclose(summary.chosen_change, summary.chosen_end - summary.chosen_start)
    for name in ("entanglement_sentiment.png", "entanglement_sentiment_heatmap.png"):
        assert (smoke / "figures" / name).stat().st_size > 10_000


def test_shared_suffix_entangles_gradients(smoke: Path) -> None:
    """Identical suffix tokens give near-identical per-token gradients (the heatmap's bright diagonal), so the
    sequence cosine of the suffix variants far exceeds the label-only one."""
    summary = results.read_table(smoke, "summary").set_index("variant")
    assert summary.cosine_start["label"] < summary.cosine_start["short-suffix"] - 0.3
    assert summary.cosine_start["label"] < summary.cosine_start["long-suffix"] - 0.3
    heat = results.read_table(smoke, "heatmaps")
    assert set(heat.stage) == {"sft", "dpo"}
    for variant in ("short-suffix", "long-suffix"):
        sub = heat[heat.variant == variant]
        assert (sub.chosen_token.iloc[0], sub.rejected_token.iloc[0]) in {("positive", "negative"),
                                                                          ("negative", "positive")}
        diagonal = sub[(sub.i == sub.j) & (sub.i > 0)]
        assert (diagonal.chosen_token == diagonal.rejected_token).all()
        assert diagonal.cosine.mean() > 0.9
        assert sub[sub.i != sub.j].cosine.abs().mean() < 0.5


def _write_stand_in(folder: Path) -> tuple[Path, Path]:
    """A tiny GPT-2 + word tokenizer saved with save_pretrained, and one jsonl of pairs per variant."""
    from rftlab import models
    from rftlab.lm_config import LMConfig
    from rftlab.tokenization import word_tokenizer

    tokenizer = word_tokenizer(sentiment.vocabulary_texts())
    model = models.build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), tokenizer)
    model_dir, data_dir = folder / "gpt2-tiny", folder / "data"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir()
    for variant in VARIANTS:
        rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
                for e in sentiment.make_examples(24, variant, seed=5)]
        (data_dir / f"{variant}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return model_dir, data_dir


def test_paper_preset_on_local_stand_in(tmp_path: Path) -> None:
    model_dir, data_dir = _write_stand_in(tmp_path)
    proc = run_rftlab("run", "entanglement-sentiment", "--preset", "paper", "--out", tmp_path / "out",
                      f"model.name_or_path={model_dir}", f"data.data_dir={data_dir}", "data.n_eval=8",
                      "data.n_stats=4", "data.n_heatmap=1", "data.variants=[label, long-suffix]", "sft.steps=2",
                      "dpo.batch_size=8", "dpo.eval_every=1", "dpo.stats_every=1")
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    metrics = results.read_metrics(folder)
    assert list(dict.fromkeys(metrics.variant)) == ["label", "long-suffix"]
    assert metrics.step.max() == 2  # one epoch: 16 training pairs / batch 8
    config = json.loads((folder / "config.json").read_text())["config"]
    assert config["dpo"]["optimizer"] == "adamw" and config["dpo"]["lr"] == 5e-6
    assert len(results.read_table(folder, "pairs")) == 2 * 3 * 4


@pytest.mark.parametrize(("words", "message"), [
    (["data.variants=[label, medium]"], "unknown data.variants"),
    (["dpo.loss=dpoo"], "did you mean"),
    (["data.source=files", "data.data_dir=/nonexistent"], "does not exist"),
])
def test_bad_input_is_one_line(tmp_path: Path, words: list[str], message: str) -> None:
    proc = run_rftlab("run", "entanglement-sentiment", "--preset", "smoke", "--out", tmp_path, *words)
    assert proc.returncode != 0
    assert message.lower() in proc.stderr.lower()
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr


def test_summary_matches_metrics(smoke: Path) -> None:
    metrics = results.read_metrics(smoke)
    summary = results.read_table(smoke, "summary")
    for _, row in summary.iterrows():
        group = metrics[metrics.variant == row.variant].sort_values("step")
        assert row.chosen_start == pytest.approx(group["logps/chosen"].iloc[0])
        assert row.margin_change == pytest.approx(group["logps/margin"].iloc[-1] - group["logps/margin"].iloc[0])
        assert row.cosine_mean == pytest.approx(pd.to_numeric(group["grad/cosine"]).mean())


@pytest.mark.slow
def test_default_preset_claims(tmp_path: Path) -> None:
    """The issue's claims on the default preset (≈ 4 min): per seed, the long-suffix chosen log-prob falls while
    the margin rises, and both the chosen log-prob's fall and the initial gradient cosine grow with the shared
    suffix (label < short-suffix < long-suffix)."""
    proc = run_rftlab("run", "entanglement-sentiment", "--out", tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    summary = results.read_table(Path(proc.stdout.strip().splitlines()[-1]), "summary")
    for _, group in summary.groupby("seed"):
        by = group.set_index("variant")
        assert by.chosen_change["long-suffix"] < 0 < by.margin_change["long-suffix"]
        assert by.chosen_change["label"] > by.chosen_change["short-suffix"] > by.chosen_change["long-suffix"]
        assert by.cosine_start["label"] < by.cosine_start["short-suffix"] < by.cosine_start["long-suffix"]


def test_a_run_killed_between_units_resumes_to_the_same_rows(tmp_path: Path) -> None:
    from rftlab import registry
    from rftlab.experiments import entanglement_sentiment as es

    spec = registry.get("entanglement-sentiment")
    cfg = registry.preset_config(spec, "smoke", [])
    whole = spec.new_run(cfg, preset="smoke", out_root=tmp_path)
    es.run(cfg, whole)
    whole.finish("complete")
    path = run_killed_then_resumed(spec, cfg, tmp_path, kill_after=2)  # after the short-suffix unit
    pd.testing.assert_frame_equal(results.read_metrics(path), results.read_metrics(whole.path))
    for table in ("summary", "pairs", "heatmaps"):
        pd.testing.assert_frame_equal(results.read_table(path, table), results.read_table(whole.path, table))
