"""Preference training pieces: batched pair log-probs equal one-at-a-time scoring, DPO starts at log 2, one small
SGD step moves both log-probs as the measured (a, b, ρ) predict, and preference files load or fail clearly."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from rftlab import models
from rftlab.data.preference_files import load_preference_pairs
from rftlab.diagnostics import pair_gradient_stats
from rftlab.errors import RftlabError
from rftlab.lm_config import LMConfig
from rftlab.preference import loss_partials, predicted_changes
from rftlab.preference_train import (
    encode_preferences,
    evaluate,
    pair_token_logps,
    preference_step,
    with_reference,
)
from rftlab.rl.sampling import response_logprobs
from rftlab.tokenization import word_tokenizer

PROMPTS = ["review : the plot was great . sentiment :", "review : the music was dull and the cast was bad . "
           "sentiment :", "review : ok . sentiment :"]
CHOSEN = ["positive i saw it friday", "negative", "positive and we went to the cinema with my friend"]
REJECTED = ["negative i saw it friday", "positive with my friend", "negative and we went"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokenizer = word_tokenizer(PROMPTS + CHOSEN + REJECTED)
    model = models.build_model(LMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=48), tokenizer)
    data = encode_preferences(tokenizer, PROMPTS, CHOSEN, REJECTED)
    return tokenizer, model.eval(), data


def test_batched_logps_equal_single_pairs(setup) -> None:
    tokenizer, model, data = setup
    with torch.no_grad():
        lw, ll = pair_token_logps(model, data)
        for i in range(len(data)):
            one = encode_preferences(tokenizer, PROMPTS[i: i + 1], CHOSEN[i: i + 1], REJECTED[i: i + 1])
            w = response_logprobs(model, one.prompt_ids, one.prompt_mask, one.chosen_ids, one.chosen_mask)
            l = response_logprobs(model, one.prompt_ids, one.prompt_mask, one.rejected_ids, one.rejected_mask)
            torch.testing.assert_close(lw[i, : w.shape[1]], w[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ll[i, : l.shape[1]], l[0], rtol=1e-5, atol=1e-5)
            assert (lw[i, w.shape[1]:] == 0).all() and (ll[i, l.shape[1]:] == 0).all()


def test_select_trims_and_token_lists_roundtrip(setup) -> None:
    tokenizer, _, data = setup
    sub = data.select([1])
    assert sub.chosen_ids.shape == (1, 1) and sub.prompt_mask.all()
    prompts, chosen, rejected = data.token_lists()
    for i in range(len(data)):
        assert chosen[i] == tokenizer(CHOSEN[i], add_special_tokens=False)["input_ids"]
        assert rejected[i] == tokenizer(REJECTED[i], add_special_tokens=False)["input_ids"]
        assert prompts[i] == tokenizer(PROMPTS[i], add_special_tokens=False)["input_ids"]


def test_dpo_starts_at_log2_and_first_order_step_matches_prediction(setup) -> None:
    _, model, data = setup
    policy = models.frozen_copy(model).requires_grad_(True)
    data = with_reference(model, data)
    lr = 1e-3
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    one = data.select([0])
    stats = pair_gradient_stats(policy, *one.token_lists(), method="exact")
    x_w, x_l = torch.tensor(stats.logp_chosen.values), torch.tensor(stats.logp_rejected.values)
    d_w, d_l = loss_partials("dpo", x_w, x_l, one.ref_chosen.double(), one.ref_rejected.double(), beta=0.1)
    pred_w, pred_l = predicted_changes(d_w, d_l, torch.tensor(stats.norm_chosen.values ** 2),
                                       torch.tensor(stats.norm_rejected.values ** 2),
                                       torch.tensor(stats.inner.values))
    out = preference_step(policy, optimizer, one, "dpo", {"beta": 0.1})
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out["rewards/margins"] == pytest.approx(0, abs=1e-6)
    after, new_w, new_l = evaluate(policy, one)
    obs_w, obs_l = float(new_w[0] - x_w[0]), float(new_l[0] - x_l[0])
    assert obs_w == pytest.approx(lr * float(pred_w[0]), rel=0.05)
    assert obs_l == pytest.approx(lr * float(pred_l[0]), rel=0.05)
    assert after["logps/margin"] > out["logps/margin"]


def test_load_preference_pairs_formats(tmp_path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        pairs = load_preference_pairs(tmp_path / name)
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                       for r in rows]
    subset = load_preference_pairs(tmp_path / "a.jsonl", n=3, seed=1)
    assert len(subset) == 3 and subset == sorted(subset, key=lambda p: int(p.prompt[1:]))
    chat = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": "no"}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat))
    assert load_preference_pairs(tmp_path / "chat.jsonl")[0].chosen == "yes"


def test_load_preference_pairs_errors(tmp_path) -> None:
    with pytest.raises(RftlabError, match="does not exist"):
        load_preference_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c"}))
    with pytest.raises(RftlabError, match="lacks column"):
        load_preference_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json")
    with pytest.raises(RftlabError, match="cannot read"):
        load_preference_pairs(tmp_path / "broken.jsonl")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(RftlabError, match="use .jsonl"):
        load_preference_pairs(tmp_path / "x.txt")
