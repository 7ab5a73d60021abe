"""K-sample rollouts: log-probs equal a separate forward, EOS masks, min length, seeds, both architectures."""

from __future__ import annotations

import pytest
import torch

from rftlab.models import LMConfig, PolicyWithValue, build_model
from rftlab.rl.sampling import (
    encode_pairs,
    response_forward,
    response_logprobs,
    response_mask_from_eos,
    sample,
    sequence_logprob,
)
from rftlab.tokenization import train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran far away from the cat", "one two three four five six seven"] * 20
# different lengths, and batch_size=2 puts a short-only chunk last so chunks are padded to a common width
PROMPTS = ["one two three four five six", "the cat", "a dog ran far away from the cat sat", "the"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def model(request, tok):
    torch.manual_seed(0)
    return build_model(LMConfig(arch=request.param, n_layer=1, n_embd=32, n_head=2, n_positions=64), tok).eval()


def eos_bias(model, eos_id: int, bias: float):
    """Add ``bias`` to the EOS logit through a hook on the LM head: generation and scoring both see it."""
    def hook(module, args, out):
        out = out.clone()
        out[..., eos_id] += bias
        return out
    return model.get_output_embeddings().register_forward_hook(hook)


def test_logprobs_equal_a_separate_forward(model, tok):
    rollout = sample(model, tok, PROMPTS, k=3, max_new_tokens=6, temperature=0.7, batch_size=3, seed=0)
    n = len(PROMPTS) * 3
    assert len(rollout) == n and rollout.response_ids.shape == (n, 6) and rollout.logprobs.shape == (n, 6)
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # every row carries its own prompt, padded on the left (causal) or on the right (seq2seq)
    for i, b in enumerate(rollout.prompt_index.tolist()):
        ids = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        assert ids == tok(PROMPTS[b])["input_ids"]
    seq2seq = model.config.is_encoder_decoder
    real_end = rollout.prompt_mask[:, 0] if seq2seq else rollout.prompt_mask[:, -1]
    assert real_end.all() and not rollout.prompt_mask.all()
    with torch.no_grad():
        again = response_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                  rollout.response_mask, temperature=0.7)
    torch.testing.assert_close(rollout.logprobs, again, atol=1e-5, rtol=0)
    assert (rollout.logprobs < 0).all() and torch.isfinite(rollout.logprobs).all()
    torch.testing.assert_close(rollout.sequence_logprobs, again.sum(-1), atol=1e-5, rtol=0)
    assert rollout.by_prompt(rollout.sequence_logprobs).shape == (4, 3)


def test_logprobs_equal_generate_scores_without_truncation(model, tok):
    """With top_k=0, top_p=1 the scored policy is the sampling distribution (checks positions under padding)."""
    side = "right" if model.config.is_encoder_decoder else "left"
    enc = tok(PROMPTS[:3], padding=True, padding_side=side, return_tensors="pt")
    torch.manual_seed(3)
    out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.3, max_new_tokens=5,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=1)
    response = out.sequences[:, 1:] if side == "right" else out.sequences[:, enc["input_ids"].shape[1]:]
    scores = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    mask = response_mask_from_eos(response, 1)
    with torch.no_grad():
        ours = response_logprobs(model, enc["input_ids"], enc["attention_mask"], response, mask, temperature=1.3)
    torch.testing.assert_close(ours * mask, scores * mask, atol=1e-5, rtol=0)


def test_response_mask_stops_after_eos(model, tok):
    handle = eos_bias(model, tok.eos_token_id, 6.0)  # P(EOS) ≈ 0.5 per step
    try:
        rollout = sample(model, tok, PROMPTS, k=4, max_new_tokens=8, seed=1)
        with torch.no_grad():
            again = response_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                      rollout.response_mask)
    finally:
        handle.remove()
    ids, mask, lengths = rollout.response_ids, rollout.response_mask, rollout.lengths
    assert lengths.min() < 8 and len(set(lengths.tolist())) > 2  # EOS at varied positions
    for i in range(len(rollout)):
        length = int(lengths[i])
        assert mask[i, :length].all() and not mask[i, length:].any()
        eos_at = (ids[i] == tok.eos_token_id).nonzero().flatten().tolist()
        if length < ids.shape[1] or eos_at:
            assert eos_at[0] == length - 1  # the last unmasked token is the first EOS
        assert (ids[i, length:] == tok.pad_token_id).all()
    assert (rollout.logprobs[mask == 0] == 0).all()
    torch.testing.assert_close(rollout.logprobs, again, atol=1e-5, rtol=0)
    texts = rollout.texts(tok)
    assert texts[0] == tok.decode(ids[0, : int(lengths[0])], skip_special_tokens=True)


def test_min_new_tokens_is_respected(model, tok):
    handle = eos_bias(model, tok.eos_token_id, 6.0)
    try:
        free = sample(model, tok, PROMPTS, k=4, max_new_tokens=8, seed=2)
        held = sample(model, tok, PROMPTS, k=4, max_new_tokens=8, min_new_tokens=5, seed=2)
    finally:
        handle.remove()
    assert free.lengths.min() < 5
    assert held.lengths.min() >= 6  # ≥ 5 tokens before the EOS
    assert not (held.response_ids[:, :5] == tok.eos_token_id).any()


def test_same_seed_same_samples_and_global_rng_untouched(model, tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sample(model, tok, PROMPTS, k=2, max_new_tokens=5, seed=7, batch_size=2)
    assert torch.equal(torch.rand(3), expected_next)  # sampling with a seed leaves the global RNG as it was
    b = sample(model, tok, PROMPTS, k=2, max_new_tokens=5, seed=7, batch_size=2)
    c = sample(model, tok, PROMPTS, k=2, max_new_tokens=5, seed=8, batch_size=2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert not torch.equal(a.response_ids[0], a.response_ids[1])  # the K samples of one prompt differ


def test_temperature_and_policy_with_value(model, tok):
    model.train()
    policy = PolicyWithValue(model)
    rollout = sample(policy, tok, PROMPTS[:2], k=2, max_new_tokens=4, temperature=2.0, seed=0)
    assert model.training  # mode restored after sampling
    model.eval()
    out = response_forward(policy, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                           rollout.response_mask, temperature=2.0)
    assert out.values.shape == (4, 4) and out.logits.shape == (4, 4, len(tok))
    manual = torch.log_softmax(out.logits, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, manual * rollout.response_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logprobs.detach(), rollout.logprobs, atol=1e-5, rtol=0)
    (out.values.sum() - sequence_logprob(out.logprobs, rollout.response_mask).mean()).backward()  # differentiable
    assert policy.value_head.weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_top_k_changes_draws_not_the_scored_policy(model, tok):
    rollout = sample(model, tok, PROMPTS[:2], k=3, max_new_tokens=5, top_k=3, top_p=0.9, seed=0)
    with torch.no_grad():
        again = response_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                  rollout.response_mask)
    torch.testing.assert_close(rollout.logprobs, again, atol=1e-5, rtol=0)


def test_encode_pairs_layout(model, tok):
    seq2seq = model.config.is_encoder_decoder
    prompt_ids, prompt_mask, response_ids, response_mask = encode_pairs(
        tok, ["the cat", "one two three four"], ["sat", "five six seven"], seq2seq=seq2seq)
    lengths = [len(tok(r)["input_ids"]) + 1 for r in ["sat", "five six seven"]]
    assert response_mask.sum(-1).tolist() == lengths
    assert response_ids[0, lengths[0] - 1] == tok.eos_token_id == response_ids[1, lengths[1] - 1]
    assert prompt_mask[0, 0 if seq2seq else -1] == 1 and prompt_mask[0, -1 if seq2seq else 0] == 0
    with torch.no_grad():
        logprobs = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    assert (logprobs[response_mask == 0] == 0).all() and (logprobs[response_mask == 1] < 0).all()


@pytest.mark.parametrize("seq2seq", [False, True])
def test_a_prompt_rendered_with_bos_keeps_one_bos(seq2seq: bool):
    """A tokenizer that adds BOS (as Llama's does) and a chat-template prompt that starts with BOS: one BOS, not
    two; prompts without it still get the tokenizer's own."""
    from tokenizers import processors

    tok = train_bpe_tokenizer(TEXTS + ["<bos>"], vocab_size=300)
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[
        ("<bos>", bos)])
    rendered, plain = "<bos><user> the cat <assistant>", "the cat"
    assert tok(rendered)["input_ids"][:2] == [bos, bos]  # what a plain call gives
    prompt_ids, prompt_mask, _, _ = encode_pairs(tok, [rendered, plain], ["sat", "sat"], seq2seq=seq2seq)
    for ids, mask in zip(prompt_ids, prompt_mask, strict=True):
        real = ids[mask.bool()].tolist()
        assert real[0] == bos and real.count(bos) == 1
    assert prompt_ids[1][prompt_mask[1].bool()].tolist() == tok(plain)["input_ids"]
    assert prompt_mask[0, 0 if seq2seq else -1] == 1 and prompt_mask[1, -1 if seq2seq else 0] == 0  # padding side


def test_too_long_for_the_position_table_is_a_user_error(tok):
    from rftlab.errors import RftlabError

    small = build_model(LMConfig(arch="gpt2", n_layer=1, n_embd=32, n_head=2, n_positions=16), tok)
    with pytest.raises(RftlabError, match="n_positions"):
        sample(small, tok, PROMPTS, k=1, max_new_tokens=12)


def test_response_mask_from_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 1, 0, 0]])
    assert response_mask_from_eos(ids, 1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
