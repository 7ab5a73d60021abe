"""The sentiment reviews behind entanglement-sentiment: labels are the majority polarity, chosen and rejected
differ in their first token only, suffix lengths follow the variant, and every word is one token."""

from __future__ import annotations

import pytest

from rftlab.data import sentiment
from rftlab.tokenization import word_tokenizer


@pytest.mark.parametrize("variant", list(sentiment.VARIANTS))
def test_pairs_share_everything_but_the_label(variant: str) -> None:
    low, high = sentiment.VARIANTS[variant]
    tokenizer = word_tokenizer(sentiment.vocabulary_texts())
    for ex in sentiment.make_examples(200, variant, seed=3):
        w = tokenizer(ex.chosen, add_special_tokens=False)["input_ids"]
        l = tokenizer(ex.rejected, add_special_tokens=False)["input_ids"]
        assert len(w) == len(l) == 1 + len(ex.suffix.split())
        assert low <= len(w) - 1 <= high
        assert w[0] != l[0] and w[1:] == l[1:]
        assert tokenizer.unk_token_id not in w + tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        assert {tokenizer.decode(w[:1]), tokenizer.decode(l[:1])} == set(sentiment.LABELS)


def test_label_is_the_majority_polarity() -> None:
    examples = sentiment.make_examples(300, "label", seed=0)
    for ex in examples:
        words = ex.prompt.split()
        pos = sum(w in sentiment.POSITIVE for w in words)
        neg = sum(w in sentiment.NEGATIVE for w in words)
        assert pos + neg in (1, 3)
        assert ex.label == ("positive" if pos > neg else "negative")
    shares = sum(ex.label == "positive" for ex in examples) / len(examples)
    assert 0.35 < shares < 0.65
    mixed = sum(0 < sum(w in sentiment.POSITIVE for w in ex.prompt.split()) < 3 and len(ex.prompt.split()) > 10
                for ex in examples)
    assert mixed > 50  # 2-vs-1 reviews make the label uncertain for an untrained model


def test_seeded_and_label_free_pretraining() -> None:
    assert sentiment.make_examples(20, "long-suffix", 1) == sentiment.make_examples(20, "long-suffix", 1)
    assert sentiment.make_examples(20, "long-suffix", 1) != sentiment.make_examples(20, "long-suffix", 2)
    texts = sentiment.pretrain_texts(500, seed=0)
    assert not any(label in t.split() for t in texts for label in sentiment.LABELS)
    with pytest.raises(ValueError, match="unknown sentiment variant"):
        sentiment.make_examples(1, "medium", 0)


def test_word_tokenizer_roundtrip(tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = word_tokenizer(["the plot was great .", "sentiment : positive"])
    ids = tokenizer("the plot was great . sentiment : zzz", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and ids[-1] == tokenizer.unk_token_id
    assert tokenizer.decode(ids[:-1]) == "the plot was great . sentiment :"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("the plot", add_special_tokens=False)["input_ids"] == ids[:2]
