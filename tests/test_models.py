"""Tiny GPT-2 / T5 from config, the local-folder loading path, the forward convention, value heads, LoRA."""

from __future__ import annotations

import pytest
import torch

from rftlab.errors import RftlabError
from rftlab.models import (
    LMConfig,
    PolicyWithValue,
    add_lora,
    build_model,
    frozen_copy,
    response_forward_hidden,
)
from rftlab.tokenization import load_tokenizer, train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran far away from the cat", "one two three four five six seven"] * 20
TINY = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def tiny(arch: str, tok, **kw):
    torch.manual_seed(0)
    return build_model(LMConfig(arch=arch, **{**TINY, **kw}), tok)


def pair_batch(tok, seq2seq: bool):
    """Two prompts of different lengths (padded) and two responses of different lengths (right-padded)."""
    side = "right" if seq2seq else "left"
    prompt = tok(["the cat", "one two three four five"], padding=True, padding_side=side, return_tensors="pt")
    response_ids = torch.tensor([[5, 17, 1, 0], [40, 41, 42, 1]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return prompt["input_ids"], prompt["attention_mask"], response_ids, response_mask


def test_build_tiny_gpt2(tok):
    model = tiny("gpt2", tok, n_layer=2, n_embd=64, n_head=4)
    c = model.config
    assert (c.model_type, c.n_layer, c.n_embd, c.n_head, c.n_inner, c.vocab_size) == ("gpt2", 2, 64, 4, 256, len(tok))
    assert (c.pad_token_id, c.eos_token_id, c.bos_token_id) == (0, 1, 1)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == (0, 1)
    assert c.resid_pdrop == c.attn_pdrop == 0.0
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, len(tok))


def test_build_tiny_t5(tok):
    model = tiny("t5", tok, n_decoder_layer=2, d_ff=48)
    c = model.config
    assert (c.model_type, c.num_layers, c.num_decoder_layers, c.d_model, c.d_ff, c.d_kv) == ("t5", 1, 2, 32, 48, 16)
    assert (c.vocab_size, c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (len(tok), 0, 1, 0)


def test_width_must_divide_into_heads(tok):
    with pytest.raises(RftlabError, match="multiple of model.n_head"):
        build_model(LMConfig(n_embd=30, n_head=4), tok)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_paper_scale_path_loads_a_saved_model_and_tokenizer(arch, tok, tmp_path):
    """name_or_path → AutoModelFor{CausalLM,Seq2SeqLM} + AutoTokenizer from a save_pretrained folder."""
    model = tiny(arch, tok).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded_tok = load_tokenizer(str(tmp_path))
    loaded = build_model(LMConfig(arch=arch, name_or_path=str(tmp_path)), loaded_tok).eval()
    assert type(loaded) is type(model) and loaded.training is False
    batch = pair_batch(loaded_tok, seq2seq=arch == "t5")
    with torch.no_grad():
        expected, _ = response_forward_hidden(model, *batch)
        got, _ = response_forward_hidden(loaded, *batch)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_missing_model_is_a_one_line_error(tok, tmp_path):
    with pytest.raises(RftlabError) as info:
        build_model(LMConfig(arch="gpt2", name_or_path=str(tmp_path / "nope")), tok)
    assert "no such folder" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RftlabError) as info:
        build_model(LMConfig(arch="t5", name_or_path="surely-not-a-cached-model-xyz"), tok)
    assert "hf download surely-not-a-cached-model-xyz" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_padded_batch_forward_equals_each_example_alone(arch, tok):
    """Left padding (causal) / right padding (seq2seq) and position ids leave every response logit unchanged."""
    model = tiny(arch, tok).eval()
    prompt_ids, prompt_mask, response_ids, response_mask = pair_batch(tok, seq2seq=arch == "t5")
    with torch.no_grad():
        batched, _ = response_forward_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
        for i in range(2):
            p, r = prompt_mask[i].bool(), response_mask[i].bool()
            alone, _ = response_forward_hidden(model, prompt_ids[i, p][None], prompt_mask[i, p][None],
                                               response_ids[i, r][None], response_mask[i, r][None])
            torch.testing.assert_close(batched[i, r], alone[0], atol=1e-5, rtol=0)
    if arch == "gpt2":  # and equals the plain causal forward of the unpadded sequence, shifted by one
        full = torch.cat([prompt_ids[1], response_ids[1]])[None]
        with torch.no_grad():
            plain = model(full).logits[0, prompt_ids.shape[1] - 1:-1]
        torch.testing.assert_close(batched[1], plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_policy_with_value_shapes_and_gradients(arch, tok):
    model = tiny(arch, tok).eval()
    policy = PolicyWithValue(model)
    batch = pair_batch(tok, seq2seq=arch == "t5")
    logits, values = policy(*batch)
    assert logits.shape == (2, 4, len(tok)) and values.shape == (2, 4)
    plain, _ = response_forward_hidden(model, *batch)
    torch.testing.assert_close(logits, plain)
    values.sum().backward()
    assert policy.value_head.weight.grad.abs().sum() > 0
    assert policy.config is model.config and policy.value_head.in_features == 32


def test_frozen_copy_is_a_detached_eval_copy(tok):
    model = tiny("gpt2", tok)
    ref = frozen_copy(model)
    assert model.training and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))  # separate storage


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_lora_trains_adapters_only(arch, tok):
    pytest.importorskip("peft", reason="LoRA needs peft (pip install peft)")
    model = tiny(arch, tok).eval()
    batch = pair_batch(tok, seq2seq=arch == "t5")
    with torch.no_grad():
        before, _ = response_forward_hidden(model, *batch)
    n_base = sum(p.numel() for p in model.parameters())
    lora = add_lora(model, r=4, alpha=8, dropout=0.0).eval()
    trainable = {n: p.numel() for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # peft's defaults: GPT-2 c_attn (32 → 96) per layer; T5 q and v (32 → 32) in 3 attention blocks
    expected = 4 * (32 + 96) if arch == "gpt2" else 6 * 4 * (32 + 32)
    assert sum(trainable.values()) == expected
    assert sum(p.numel() for p in lora.parameters()) == n_base + expected
    with torch.no_grad():  # B = 0 at init: the adapted model computes the same function
        after, _ = response_forward_hidden(lora, *batch)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_lora_on_policy_with_value_keeps_the_value_head_trainable(tok):
    pytest.importorskip("peft", reason="LoRA needs peft (pip install peft)")
    policy = add_lora(PolicyWithValue(tiny("gpt2", tok)), r=2, alpha=4, dropout=0.0)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert {"value_head.weight", "value_head.bias"} <= set(trainable)
    assert all("lora_" in n or n.startswith("value_head") for n in trainable)
    logits, values = policy(*pair_batch(tok, seq2seq=False))
    assert values.shape == (2, 4)
