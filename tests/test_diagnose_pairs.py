"""``rftlab diagnose pairs`` on a tiny GPT-2 (and T5) saved with save_pretrained and pairs written here: the
per-pair statistics equal ``pair_gradient_stats`` on the same token ids, the thresholds equal
``threshold_coefficients``, identical and one-token-apart pairs read as the theory says, PEFT adapters, chat
rows, the shared-token statistics, and one-line errors for bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from rftlab import config, models, results, tokenization
from rftlab import diagnose as package
from rftlab.cli import app
from rftlab.data.edit_pairs import make_edit_pairs
from rftlab.data.preference_files import load_preference_pairs
from rftlab.diagnose import inputs, pairs
from rftlab.diagnostics import pair_gradient_stats
from rftlab.errors import RftlabError
from rftlab.lm_config import LMConfig
from rftlab.preference import classify_regimes, threshold_coefficients

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning", "the sun is warm today",
         "good bad fine great awful", "the rug was cold", "cry sing"]
# (prompt, chosen, rejected): one-token substitutions, an identical pair, shared suffixes, an empty prompt
PAIRS = [
    ("the cat", "sat on the mat", "sat on the rug"),
    ("a dog", "good", "bad"),
    ("a dog", "ran in the park", "ran in the park"),
    ("the sun", "is warm today", "was cold today"),
    ("birds", "sing in the morning", "cry in the morning"),
    ("", "good dog", "awful cat sat"),
    ("the park", "is green", "the rug was cold in the morning"),
    ("a cat", "sat on the mat", "sat"),
]
IDENTICAL, ONE_TOKEN = 2, 0


def write_pairs(path: Path, rows=PAIRS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return path


def save_model(folder: Path, seed: int, arch: str = "gpt2") -> Path:
    tokenizer = tokenization.word_tokenizer(TEXTS)
    torch.manual_seed(seed)
    model = models.build_model(LMConfig(arch=arch, n_layer=1, n_embd=32, n_head=2, n_positions=64), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, saved_model, pairs_file) -> Path:
    """One default diagnosis (dpo, the model as reference, params=all, method auto = fast)."""
    return diagnose(tmp_path_factory.mktemp("out"), f"model={saved_model}", f"pairs={pairs_file}")


def diagnose(out: Path, *words: str) -> Path:
    cfg = config.resolve(pairs.Config, [], list(words))
    return package.execute("pairs", cfg, out_root=out)


def token_ids(tokenizer, rows=PAIRS) -> tuple[list, list, list]:
    """The ids the diagnosis should use, tokenized here independently: prompt with special tokens ([BOS] when
    empty), responses without them plus EOS."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id

    def response(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    return ([tokenizer(p)["input_ids"] or [bos] for p, _, _ in rows], [response(c) for _, c, _ in rows],
            [response(r) for _, _, r in rows])


def assert_stats_equal(table: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-4) -> None:
    for column in ("norm_chosen", "norm_rejected", "logp_chosen", "logp_rejected"):
        np.testing.assert_allclose(table[column], expected[column], rtol=rtol, err_msg=column)
    # ρ and κ can be near 0 for unrelated responses: compare them on the scale of the values they take
    scale = float(np.abs(expected.inner).max())
    np.testing.assert_allclose(table.inner, expected.inner, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(table.cosine, expected.cosine, rtol=rtol, atol=rtol)


# ------------------------------------------------------------------------------------------ the numbers
def test_statistics_equal_pair_gradient_stats_on_the_same_token_ids(dpo_run, saved_model) -> None:
    table = results.read_table(dpo_run, "pairs")
    assert table.pair_id.tolist() == list(range(len(PAIRS)))
    assert table.prompt.tolist() == [p for p, _, _ in PAIRS] and table.rejected.tolist() == [r for *_, r in PAIRS]
    model, tokenizer = inputs.load_model(str(saved_model))
    x, y_w, y_l = token_ids(tokenizer)
    assert table.len_chosen.tolist() == list(map(len, y_w)) and table.len_prompt.tolist() == list(map(len, x))
    expected = pair_gradient_stats(model, x, y_w, y_l, params="all", method="exact")
    assert_stats_equal(table, expected)
    meta = json.loads((dpo_run / "config.json").read_text())
    assert meta["status"] == "complete" and results.read_metrics(dpo_run)["method"].item() == "fast"

    # DPO with the model as its own reference: thresholds (1, 1), DPO's regime, reference log-probs = policy's
    assert (table.c_chosen == 1).all() and (table.c_rejected == 1).all()
    assert table.regime.tolist() == table.dpo_regime.tolist() == expected.regime.tolist()
    np.testing.assert_array_equal(table.ref_logp_chosen, table.logp_chosen)
    np.testing.assert_allclose(table.d_w, -0.05)  # −β·σ(0) at a zero margin
    # identical responses: a − ρ is float64 rounding (≈1e-15), so the tolerance is absolute there
    np.testing.assert_allclose(table.pred_dw, 0.05 * (table.norm_chosen ** 2 - table.inner), rtol=1e-7,
                               atol=1e-12 * float((table.norm_chosen ** 2).max()))


def test_identical_responses_are_both_at_risk_and_one_token_apart_is_counted(dpo_run) -> None:
    table = results.read_table(dpo_run, "pairs")
    same = table.iloc[IDENTICAL]
    assert same.regime == "both" and same.chosen_at_risk and same.rejected_at_risk
    assert same.cosine == pytest.approx(1, rel=1e-5) and same.rho_over_a == pytest.approx(1, rel=1e-5)
    assert same.shared_fraction == 1 and same.edit_distance == 0 and same.shared_prefix == same.len_chosen
    one = table.iloc[ONE_TOKEN]  # "sat on the mat <eos>" vs "sat on the rug <eos>"
    assert one.edit_distance == 1 and one.shared_fraction == pytest.approx(4 / 5) and one.shared_prefix == 3
    assert table.iloc[1].shared_fraction == pytest.approx(1 / 2)  # "good <eos>" vs "bad <eos>": the EOS is shared
    # the regime is the sign of the first-order change where the pair is not on a threshold
    clear = ~np.isclose(table.rho_over_a, 1, rtol=1e-4) & ~np.isclose(table.rho_over_b, 1, rtol=1e-4)
    assert ((table.pred_dw < 0) == table.chosen_at_risk)[clear].all()
    assert ((table.pred_dl > 0) == table.rejected_at_risk)[clear].all()


def test_summary_names_the_shares_and_both_figures_are_drawn(dpo_run, tmp_path) -> None:
    table = results.read_table(dpo_run, "pairs")
    summary = (dpo_run / "summary.md").read_text()
    for regime in ("ideal", "chosen_down", "rejected_up", "both"):
        count = int((table.regime == regime).sum())
        assert f"| {regime} | {pairs.REGIME_MEANING[regime]} | {count} | {count / len(table):.1%} |" in summary
    assert "inactive" not in summary.split("##")[0].split("**")[0]  # no row for a regime no pair is in
    assert f"mean {table.cosine.mean():.3f}" in summary and "Pairs most at risk" in summary
    assert f"| {IDENTICAL} | both |" in summary.split("## Pairs most at risk")[1].splitlines()[4]  # ranked first
    figures = sorted((dpo_run / "figures").iterdir())
    assert [f.name for f in figures] == ["diagnose_pairs_cosine.png", "diagnose_pairs_regimes.png"]
    assert all(f.stat().st_size > 10_000 for f in figures)
    again = pairs.plot([dpo_run], tmp_path / "figures", "pdf")
    assert [f.name for f in again] == ["diagnose_pairs_cosine.pdf", "diagnose_pairs_regimes.pdf"]
    assert all(f.stat().st_size > 1000 for f in again)


def test_other_losses_take_their_thresholds_from_threshold_coefficients(tmp_path, saved_model, pairs_file) -> None:
    # IPO with a separate reference model: its log-probs set the margin h and so the signs of p and q
    ref = save_model(tmp_path / "ref", seed=1)
    # β = 10: IPO's target margin 1/(2β) = 0.05 lies inside the spread of the margins the two random models give
    folder = diagnose(tmp_path / "out", f"model={saved_model}", f"pairs={pairs_file}", "loss=ipo", "beta=10",
                      f"ref={ref}", "method=exact")
    table = results.read_table(folder, "pairs")
    ref_model, tokenizer = inputs.load_model(str(ref))
    x, y_w, y_l = token_ids(tokenizer)
    ref_stats = pair_gradient_stats(ref_model, x, y_w, y_l, method="exact")
    np.testing.assert_allclose(table.ref_logp_chosen, ref_stats.logp_chosen, rtol=1e-5)
    np.testing.assert_allclose(table.ref_logp_rejected, ref_stats.logp_rejected, rtol=1e-5)
    t = {c: torch.tensor(table[c].to_numpy(), dtype=torch.float64) for c in
         ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "len_chosen", "len_rejected")}
    c_w, c_l = threshold_coefficients("ipo", *t.values(), beta=10)
    np.testing.assert_allclose(table.c_chosen, c_w.numpy())
    np.testing.assert_allclose(table.c_rejected, c_l.numpy())
    np.testing.assert_allclose(table.c_chosen, table.len_rejected / table.len_chosen)  # p/q = |y_l|/|y_w|
    a, b = table.norm_chosen ** 2, table.norm_rejected ** 2
    assert table.regime.tolist() == classify_regimes(a, b, table.inner, -table.d_w, table.d_l).tolist()
    # past the target margin both partials change sign and so do the inequalities: the chosen falls iff ρ < c·a
    past = (table.d_l < 0).to_numpy()
    assert 0 < past.sum() < len(table) and ((table.d_w > 0) == past).all()
    off = ~np.isclose(table.rho_over_ca, 1, rtol=1e-4)  # the identical pair sits on the threshold (a tie)
    below = (table.inner < table.c_chosen * a).to_numpy()
    np.testing.assert_array_equal(table.chosen_at_risk[past & off], below[past & off])
    np.testing.assert_array_equal(table.chosen_at_risk[~past & off], ~below[~past & off])
    np.testing.assert_array_equal(table.chosen_at_risk[off], (table.pred_dw < 0)[off])
    assert table.chosen_at_risk[IDENTICAL] and table.rejected_at_risk[IDENTICAL]


def test_cli_simpo_run_is_reference_free(tmp_path, saved_model, pairs_file) -> None:
    result = CliRunner().invoke(app, ["diagnose", "pairs", "--model", str(saved_model), "--pairs", str(pairs_file),
                                      "--loss", "simpo", "--ref", str(saved_model), "--out", str(tmp_path / "o"),
                                      "gamma=0.3"])
    assert result.exit_code == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert "Gradient entanglement" in result.stderr and "has no reference term" in result.stderr
    table = results.read_table(folder, "pairs")
    assert table.ref_logp_chosen.isna().all()
    lengths = [torch.tensor(table[c].to_numpy(), dtype=torch.float64) for c in ("len_chosen", "len_rejected")]
    c_w, c_l = threshold_coefficients("simpo", torch.tensor(table.logp_chosen.to_numpy()),
                                      torch.tensor(table.logp_rejected.to_numpy()), None, None, *lengths,
                                      beta=0.1, gamma=0.3)
    np.testing.assert_allclose(table.c_chosen, c_w.numpy())
    np.testing.assert_allclose(table.c_rejected, c_l.numpy())
    np.testing.assert_allclose(table.c_chosen, table.len_rejected / table.len_chosen)  # SimPO: length ratio


def test_regime_names_are_the_preference_modules() -> None:
    from rftlab import preference

    assert pairs.REGIMES == preference.REGIMES


def test_method_auto_falls_back_to_exact_where_fast_has_no_rule(tmp_path, saved_model, pairs_file, monkeypatch,
                                                                dpo_run) -> None:
    import rftlab.diagnostics as diagnostics

    original = diagnostics.pair_gradient_stats

    def no_fast(*args, method="fast", **kwargs):  # as for a model with RMSNorm under params=all
        if method == "fast":
            raise RftlabError("method='fast' has no per-example gradient rule for RMSNorm (parameter 'norm.weight'); "
                              "use method='exact' (or 'func').")
        return original(*args, method=method, **kwargs)

    monkeypatch.setattr(diagnostics, "pair_gradient_stats", no_fast)
    folder = diagnose(tmp_path / "out", f"model={saved_model}", f"pairs={pairs_file}", "chunk_size=4")
    assert results.read_metrics(folder)["method"].item() == "exact"
    assert "Running method='exact'" in (folder / "log.txt").read_text()
    assert_stats_equal(results.read_table(folder, "pairs"), results.read_table(dpo_run, "pairs"))
    with pytest.raises(RftlabError, match="RMSNorm"):  # an explicit method is never replaced
        diagnose(tmp_path / "out2", f"model={saved_model}", f"pairs={pairs_file}", "method=fast")


# ------------------------------------------------------------------------------ adapters, chat, seq2seq
def test_peft_adapter_gradients_live_in_the_adapter(tmp_path, saved_model, pairs_file, dpo_run) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    torch.manual_seed(0)  # init_lora_weights=False: B ≠ 0, so both LoRA factors get gradients
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                              init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    folder = diagnose(tmp_path / "out", f"model={tmp_path / 'adapter'}", f"pairs={pairs_file}", "params=lora")
    table = results.read_table(folder, "pairs")
    model, tokenizer = inputs.load_model(str(tmp_path / "adapter"))
    expected = pair_gradient_stats(model, *token_ids(tokenizer), params="lora", method="exact")
    assert_stats_equal(table, expected)
    assert not np.allclose(table.norm_chosen, results.read_table(dpo_run, "pairs").norm_chosen, rtol=1e-2)
    assert "lora" in (folder / "summary.md").read_text()
    with pytest.raises(RftlabError, match="params=lora needs a PEFT adapter"):
        diagnose(tmp_path / "out", f"model={saved_model}", f"pairs={pairs_file}", "params=lora")


def test_conversational_rows_are_flattened_or_rendered(tmp_path, saved_model) -> None:
    path = tmp_path / "chat.jsonl"
    row = {"prompt": [{"role": "user", "content": "the cat"}],
           "chosen": [{"role": "assistant", "content": "sat on the mat"}],
           "rejected": [{"role": "assistant", "content": "sat on the rug"}]}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt": [{"role": "user", "content": "a dog"}]})
                    + "\n")
    table = results.read_table(diagnose(tmp_path / "out", f"model={saved_model}", f"pairs={path}"), "pairs")
    assert table.prompt.tolist() == ["the cat", "a dog"] and table.chosen.tolist() == ["sat on the mat"] * 2

    templated = tmp_path / "templated"
    shutil.copytree(saved_model, templated)
    tokenizer = tokenization.load_tokenizer(str(templated))
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}" \
                              "{% if add_generation_prompt %}<assistant>{% endif %}"
    tokenizer.save_pretrained(templated)
    table = results.read_table(diagnose(tmp_path / "out", f"model={templated}", f"pairs={path}"), "pairs")
    assert table.prompt[0] == "<user> the cat <assistant>" and table.chosen[0] == " sat on the mat "
    assert table.len_prompt[0] == len(tokenizer("<user> the cat <assistant>")["input_ids"])


def test_seq2seq_models_use_the_exact_method(tmp_path, pairs_file) -> None:
    folder = diagnose(tmp_path / "out", f"model={save_model(tmp_path / 't5', seed=0, arch='t5')}",
                      f"pairs={pairs_file}", "loss=cpo")
    assert results.read_metrics(folder)["method"].item() == "exact"
    model, tokenizer = inputs.load_model(str(tmp_path / "t5"))
    # the empty prompt becomes [EOS] for seq2seq models; this tokenizer's BOS is its EOS, so token_ids applies
    table = results.read_table(folder, "pairs")
    assert_stats_equal(table, pair_gradient_stats(model, *token_ids(tokenizer), method="exact"), rtol=1e-6)
    # CPO's NLL term on the chosen: c_chosen > 1 > c_rejected, so identical responses only raise the rejected
    assert (table.c_chosen > 1).all() and (table.c_rejected < 1).all()
    assert table.regime[IDENTICAL] == "rejected_up"


# ------------------------------------------------------------------------------------- token statistics
def _lcs_reference(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def _levenshtein_reference(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_shared_fraction_and_edit_distance() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]
        assert pairs.lcs_length(a, b) == _lcs_reference(a, b)
        assert pairs.edit_distance(a, b) == _levenshtein_reference(a, b)
    assert pairs.shared_fraction([1, 2, 3], [1, 2, 3]) == 1 and pairs.shared_fraction([], []) == 1
    assert pairs.shared_fraction([1, 2], [3]) == 0 and pairs.shared_fraction([1, 2, 3, 4], [9, 2, 3]) == 0.5
    assert pairs.edit_distance("kitten", "sitting") == 3 and pairs.shared_prefix([1, 2, 3], [1, 2, 4]) == 2
    # edit pairs with no token repeated: the shared fraction is theirs, (n − k)/n, and k substitutions apart
    edits = make_edit_pairs([[0]], [list(range(10, 18))], n=8, ks=(1, 2, 4, 8), pool=range(100, 140), seed=0)
    for e in edits:
        assert pairs.shared_fraction(e.chosen, e.rejected) == pytest.approx(e.shared_fraction)
        assert pairs.edit_distance(e.chosen, e.rejected) == e.k


def test_max_pairs_keeps_the_rows_load_preference_pairs_keeps(tmp_path, pairs_file) -> None:
    cfg = pairs.Config(pairs=str(pairs_file), max_pairs=3, seed=5)
    rows, subset = pairs.load_pairs(cfg, tokenizer=None)
    assert subset == load_preference_pairs(pairs_file, n=3, seed=5) and len(rows) == 3
    assert [PAIRS[i][1:] for i in rows] == [(p.chosen, p.rejected) for p in subset]


# ------------------------------------------------------------------------------------------------ errors
def test_missing_inputs_fail_in_one_line_before_any_folder(tmp_path, saved_model, pairs_file) -> None:
    out = tmp_path / "out"
    for words, message in ([[f"model={saved_model}"], "needs --pairs"],
                           [[f"pairs={pairs_file}"], "needs --model"],
                           [[f"model={saved_model}", f"pairs={tmp_path / 'missing.jsonl'}"], "does not exist"],
                           [["model=./no-model", f"pairs={pairs_file}"], "does not exist"],
                           [[f"model={saved_model}", f"pairs={pairs_file}", "ref=./no-ref"], "does not exist"]):
        with pytest.raises(RftlabError, match=message) as err:
            diagnose(out, *words)
        assert "\n" not in str(err.value)
    assert not out.exists()


def test_bad_config_values_are_one_line_errors() -> None:
    with pytest.raises(RftlabError, match="unknown preference loss 'dpoo'. Did you mean 'dpo'") as err:
        config.resolve(pairs.Config, [], ["loss=dpoo"])
    assert "Known: " in str(err.value) and "simpo" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RftlabError, match="gamma does not apply to loss 'dpo', which takes beta"):
        config.resolve(pairs.Config, [], ["gamma=0.5"])
    with pytest.raises(RftlabError, match="bad value 'every' for params: expected one of 'all'"):
        config.resolve(pairs.Config, [], ["params=every"])
    assert pairs.hparams(config.resolve(pairs.Config, [], ["loss=rdpo", "beta=0.2"])) == {"beta": 0.2, "alpha": 0.2}
    assert pairs.hparams(config.resolve(pairs.Config, [], ["loss=orpo", "lam=0.3"])) == {"lam": 0.3}


def test_a_missing_column_names_the_columns(tmp_path, saved_model) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({"prompt": ["the cat"], "chosen": ["sat"], "answer": ["mat"]}).to_csv(path, index=False)
    with pytest.raises(RftlabError, match="lacks column\\(s\\) rejected; found prompt, chosen, answer") as err:
        diagnose(tmp_path / "out", f"model={saved_model}", f"pairs={path}")
    assert "\n" not in str(err.value)
    (folder,) = (tmp_path / "out" / "diagnose-pairs").iterdir()  # the folder records the failure
    assert json.loads((folder / "config.json").read_text())["status"] == "failed"
