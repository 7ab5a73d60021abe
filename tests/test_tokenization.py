"""Offline tokenizers: training, save/load round trips, pad handling, one-line errors."""

from __future__ import annotations

import pytest

from rftlab.errors import RftlabError
from rftlab.tokenization import char_tokenizer, load_tokenizer, train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran far away from the cat", "one two three four five six seven"] * 20


def test_bpe_round_trip_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<pad>", 0,
                                                                                                   "<eos>", 1, 1)
    assert 258 < len(tok) <= 300
    samples = ["the cat sat", "unseen wörds, even émoji 🙂", "  spaces\nand newlines"]
    ids = tok(samples)["input_ids"]
    assert [tok.decode(row) for row in ids] == samples  # byte level: every string round-trips
    assert len(tok("the cat sat on the mat")["input_ids"]) < len("the cat sat on the mat") / 2  # merges learned
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(samples)["input_ids"] == ids
    assert (again.pad_token_id, again.eos_token_id) == (0, 1)


def test_padding_side_is_configurable_and_saved(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300, padding_side="left")
    batch = tok(["the cat", "one two three four"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1
    assert batch["input_ids"][0][0] == tok.pad_token_id
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).padding_side == "left"
    assert load_tokenizer(str(tmp_path), padding_side="right").padding_side == "right"


def test_bpe_vocab_too_small_is_a_user_error():
    with pytest.raises(RftlabError, match="258"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)


def test_char_tokenizer_round_trip_and_unknown_characters(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer(["hello world\n", "bar"])
    # specials first, then the sorted characters: "\n", " ", "a", "b", "d", "e", "h", "l", "o", "r", "w"
    assert len(tok) == 3 + 11
    ids = tok("hello\nbar")["input_ids"]
    assert len(ids) == 9 and tok.decode(ids) == "hello\nbar"
    assert tok("zq")["input_ids"] == [tok.unk_token_id] * 2
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("hello\nbar")["input_ids"] == ids


def test_load_tokenizer_gives_eos_as_pad_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a GPT-2-like tokenizer: an end-of-text token and no pad token
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == 0


@pytest.mark.parametrize(("name", "expected"), [
    ("/no/such/folder", "no such folder"),
    ("surely-not-a-cached-model-xyz", "hf download surely-not-a-cached-model-xyz"),
])
def test_missing_tokenizer_is_one_line(name, expected):
    with pytest.raises(RftlabError) as info:
        load_tokenizer(name)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_folder_without_tokenizer_names_the_folder(tmp_path):
    with pytest.raises(RftlabError, match="from folder"):
        load_tokenizer(str(tmp_path))
