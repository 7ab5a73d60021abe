"""Rewards against hand-computed values on small strings."""

import math

import pytest

from rftlab.errors import RftlabError
from rftlab.rewards import (
    REWARDS,
    bleu,
    chrf,
    concept_coverage,
    exact_match,
    get_reward,
    rouge_l_max,
    token_f1,
    vader_sentiment,
)


def test_every_reward_is_documented_in_zero_one():
    for name, spec in REWARDS.items():
        assert spec.range == (0.0, 1.0), name
        assert spec.fn.__doc__ and spec.description, name


def test_rouge_l_is_lcs_f_measure_max_over_references():
    # LCS("a b c d", "a c e") = 2: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7; the second reference scores 0.
    assert rouge_l_max(["a b c d"], [["a c e", "x y"]]) == pytest.approx([4 / 7])
    assert rouge_l_max(["the sailors mended nets"], [["the sailor mend net"]]) == pytest.approx([1.0])  # stemming
    assert rouge_l_max(["zzz"], [["a b"]]) == [0.0]


def test_rouge_l_cuts_both_texts_to_max_words():
    long = " ".join(["w"] * 150)
    assert rouge_l_max([long], [[" ".join(["w"] * 100)]]) == pytest.approx([1.0])


def test_bleu_of_a_copy_is_one_and_of_a_prefix_is_the_brevity_penalty():
    assert bleu(["the cat sat on the mat ."], [["the cat sat on the mat ."]]) == [1.0]
    assert bleu(["a b"], [["a b"]]) == [1.0]  # effective order: no 3/4-grams to miss
    # every n-gram precision is 1; BP = exp(1 − 8/5)
    assert bleu(["a b c d e"], [["a b c d e f g h"]]) == pytest.approx([math.exp(-0.6)], abs=1e-4)
    assert bleu(["q r s t"], [["a b c d"]]) == [0.0]
    assert bleu(["a b c d e"], [["x", "a b c d e f g h"]]) == pytest.approx([math.exp(-0.6)], abs=1e-4)


def test_chrf_copy_is_one_and_uses_the_best_reference():
    assert chrf(["the cat"], [["dog", "the cat"]]) == [1.0]
    value = chrf(["the cat"], [["the cot"]])[0]
    assert 0.0 < value < 1.0


def test_token_f1_partial_overlap():
    # normalised "cat sat" vs "cat sat down": P = 1, R = 2/3, F1 = 0.8
    assert token_f1(["the cat sat"], [["a cat sat down"]]) == pytest.approx([0.8])
    assert token_f1(["dog"], [["cat", "the dog"]]) == [1.0]
    assert token_f1(["dog"], [["cat"]]) == [0.0]


def test_exact_match_normalises_case_punctuation_articles():
    assert exact_match(["The  Cat!", "cats"], [["a cat"], ["a cat"]]) == [1.0, 0.0]


def test_concept_coverage_fraction_from_prompt_or_meta():
    prompt = "generate a sentence with: apple tree pick."
    assert concept_coverage(["the boy picked apples"], [[]], [prompt]) == pytest.approx([2 / 3])
    assert concept_coverage(["x"], [[]], ["generate a sentence with: apple, tree"]) == [0.0]
    assert concept_coverage(["the sailor mends the net", "nothing"], [[], []],
                            concepts=[["net", "sailor", "mend"], ["net"]]) == [1.0, 0.0]


def test_vader_maps_compound_to_unit_interval_with_sign():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["a wonderful , lovely film", "a terrible , boring film", ""]
    values = vader_sentiment(texts, [[]] * 3)
    assert values[0] > 0.75 and values[1] < 0.25 and values[2] == 0.5
    compound = SentimentIntensityAnalyzer().polarity_scores(texts[0])["compound"]
    assert values[0] == pytest.approx((compound + 1) / 2)
    with_prompt = vader_sentiment(["it was ok"], [[]], ["a wonderful start ,"], include_prompt=True)
    assert with_prompt[0] > vader_sentiment(["it was ok"], [[]])[0]


def test_repeated_pairs_score_once_and_identically():
    out = rouge_l_max(["a b", "a b", "c"], [["a b c"], ["a b c"], ["a b c"]])
    assert out[0] == out[1] == pytest.approx(0.8) and out[2] == pytest.approx(0.5)
    with pytest.raises(RftlabError, match="2 completions but 1"):
        bleu(["a", "b"], [["a"]])


def test_get_reward_suggests_close_names_and_imports_user_rewards():
    with pytest.raises(RftlabError, match="Did you mean 'rouge_l_max'"):
        get_reward("rouge_l")
    assert get_reward("rftlab.rewards:token_f1") is token_f1
    with pytest.raises(RftlabError, match="cannot import reward"):
        get_reward("rftlab.rewards:nope")
    intl = get_reward("bleu", tokenize="intl")
    assert intl(["a b c d"], [["a b c d"]]) == [1.0]


def test_meteor_needs_wordnet_or_says_how_to_get_it():
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        with pytest.raises(RftlabError, match="nltk.downloader wordnet"):
            get_reward("meteor")
    else:
        assert get_reward("meteor")(["a cat sat"], [["a cat sat"]])[0] > 0.9


def test_classifier_is_softmax_probability_of_label(tmp_path):
    import torch
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "a", "the"]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, hidden_dim=32, num_labels=2,
                              max_position_embeddings=32)
    model = DistilBertForSequenceClassification(config).eval()
    folder = tmp_path / "clf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    reward = get_reward("classifier", model_path=str(folder), label_ix=1, batch_size=2, device="cpu")
    prompts, completions = ["a", "the", "a"], ["good film", "bad film", "film good bad"]
    got = reward(completions, [[]] * 3, prompts)
    with torch.no_grad():
        enc = tokenizer([f"{p} {c}" for p, c in zip(prompts, completions, strict=True)], padding=True,
                        return_tensors="pt")
        want = torch.softmax(model(**enc).logits, -1)[:, 1].tolist()
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(RftlabError, match="model_path"):
        get_reward("classifier", model_path=str(tmp_path / "missing"))
