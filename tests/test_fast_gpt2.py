"""The fused GPT-2 path computes what the model's own forward and ``generate`` compute: log-probs and their
gradients (packed and dense layouts, shared prompts, bf16 autocast), the same draws under one seed, and it
steps aside for anything it does not cover."""

from __future__ import annotations

import pytest
import torch

from rftlab.models import LMConfig, PolicyWithValue, build_model
from rftlab.rl import fast_gpt2
from rftlab.rl.sampling import response_forward, response_logprobs, sample
from rftlab.tokenization import train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran far away from the cat", "one two three four five six seven"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_model(LMConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64), tok).eval()


def batch(prompt_lengths: list[int], response_lengths: list[int], k: int, seed: int = 0):
    """Left-padded prompts, k right-padded responses per prompt (prompt-major), random ids ≥ 2."""
    gen = torch.Generator().manual_seed(seed)
    p, t = max(prompt_lengths), max(response_lengths)
    pm = (torch.arange(p) >= p - torch.tensor(prompt_lengths)[:, None]).long()
    rm = (torch.arange(t) < torch.tensor(response_lengths)[:, None]).long()
    prompt_ids = torch.randint(2, 300, pm.shape, generator=gen) * pm
    response_ids = torch.randint(2, 300, rm.shape, generator=gen) * rm
    group = torch.arange(len(prompt_lengths)).repeat_interleave(k)
    return prompt_ids, pm, response_ids, rm, group


@pytest.mark.parametrize("response_lengths", [[1, 5, 9, 3, 7, 2], [9, 9, 9, 9, 9, 8]], ids=["packed", "dense"])
def test_grouped_logprobs_and_gradients_equal_the_models_forward(model, response_lengths) -> None:
    prompt_ids, pm, response_ids, rm, group = batch([6, 2, 4], response_lengths, k=2)
    layout = fast_gpt2._layout(prompt_ids, pm, response_ids, rm, group)
    assert (layout.r_gather is None) == (response_lengths[0] == 9)
    ours = fast_gpt2.grouped_logprobs(model, prompt_ids, pm, response_ids, rm, group, temperature=0.7)
    theirs = response_forward(model, prompt_ids[group], pm[group], response_ids, rm, temperature=0.7).logprobs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours[rm == 0] == 0).all()
    params = list(model.parameters())
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    g_ours = torch.autograd.grad((ours * weights).sum(), params)
    g_theirs = torch.autograd.grad((theirs * weights).sum(), params)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_checkpoint_activations_run_as_the_model_runs_them(tok, activation) -> None:
    """GPT-2 checkpoints use gelu_new, which the fused path runs as torch's tanh-GELU kernel; others as given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                                    activation_function=activation)).eval()
    kernel = fast_gpt2._activation(lm.transformer.h[0].mlp.act) is fast_gpt2._tanh_gelu
    assert kernel == (activation == "gelu_new")
    prompt_ids, pm, response_ids, rm, group = batch([5, 3], [4, 6, 2, 5], k=2, seed=2)
    ours = fast_gpt2.grouped_logprobs(lm, prompt_ids, pm, response_ids, rm, group)
    theirs = response_forward(lm, prompt_ids[group], pm[group], response_ids, rm).logprobs
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    params = list(lm.parameters())
    for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(theirs.sum(), params), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_bf16_autocast_stays_close_and_response_logprobs_shares_prompts(model) -> None:
    prompt_ids, pm, response_ids, rm, group = batch([5, 3], [4, 6, 2, 5], k=2, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fast_gpt2.grouped_logprobs(model, prompt_ids, pm, response_ids, rm, group)
        theirs = response_forward(model, prompt_ids[group], pm[group], response_ids, rm).logprobs
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.02)
    # repeated prompt rows are found and encoded once; the result is the per-row forward's
    torch.testing.assert_close(response_logprobs(model, prompt_ids[group], pm[group], response_ids, rm),
                               response_forward(model, prompt_ids[group], pm[group], response_ids, rm).logprobs,
                               atol=1e-5, rtol=0)


def test_sampler_draws_what_generate_draws(model, tok) -> None:
    prompt_ids, pm, _, _, _ = batch([5, 2, 3], [1], k=1, seed=4)
    torch.manual_seed(7)
    ours = fast_gpt2.sample_tokens(model, prompt_ids, pm, 3, max_new_tokens=7, min_new_tokens=2, temperature=1.3,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    out = model.generate(input_ids=prompt_ids, attention_mask=pm, do_sample=True, num_return_sequences=3,
                         max_new_tokens=7, min_new_tokens=2, temperature=1.3, top_k=0, top_p=1.0,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert torch.equal(ours, out[:, prompt_ids.shape[1]:])
    assert not ours.is_inference()  # usable as input of a training forward


def test_decode_attention_equals_sdpa_over_each_rows_full_cache() -> None:
    """Prompt keys kept once per prompt and read by its K rows give softmax attention over [prompt ; own tokens]."""
    gen = torch.Generator().manual_seed(0)
    b, k, h, p, t, d_h = 3, 4, 2, 5, 3, 8
    prompt_mask = (torch.arange(p) >= p - torch.tensor([5, 2, 3])[:, None])  # left padding
    prompt_kv = torch.randn(2, b, h, p, d_h, generator=gen)
    cache = torch.randn(2, t + 2, b * k, h, d_h, generator=gen)  # step-major, room for 2 more steps
    new_kv = cache[:, :t]
    q = torch.randn(b * k, h, 1, d_h, generator=gen)
    bias = torch.zeros(b * h, 1, p).masked_fill(~prompt_mask.repeat_interleave(h, 0)[:, None], -float("inf"))
    ours = fast_gpt2._decode_attention(q * 0.3, prompt_kv, bias, new_kv)
    per_row = new_kv.permute(0, 2, 3, 1, 4)  # (2, R, H, t, d_h)
    keys = torch.cat([prompt_kv[0].repeat_interleave(k, 0), per_row[0]], 2)  # (R, H, P + t, d_h), row r: prompt r // K
    values = torch.cat([prompt_kv[1].repeat_interleave(k, 0), per_row[1]], 2)
    visible = torch.cat([prompt_mask.repeat_interleave(k, 0), torch.ones(b * k, t, dtype=torch.bool)], 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None],
                                                                scale=0.3)
    torch.testing.assert_close(ours, expected.reshape(b * k, h * d_h), atol=1e-6, rtol=1e-5)


def test_sampler_stops_at_eos_like_generate(model, tok) -> None:
    import copy

    eos, pad = tok.eos_token_id, tok.pad_token_id
    eager = copy.deepcopy(model)
    with torch.no_grad():  # raise the EOS logit by ≈4 through the final norm's bias (no hook: hooks disable the path)
        w = eager.transformer.wte.weight[eos]
        eager.transformer.ln_f.bias += 4 * w / w.dot(w)
    prompt_ids, pm, _, _, _ = batch([4, 4], [1], k=1, seed=5)
    torch.manual_seed(3)
    ours = fast_gpt2.sample_tokens(eager, prompt_ids, pm, 4, max_new_tokens=12, min_new_tokens=0, temperature=1.0,
                                   eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(3)
    out = eager.generate(input_ids=prompt_ids, attention_mask=pm, do_sample=True, num_return_sequences=4,
                         max_new_tokens=12, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos)
    assert torch.equal(ours, out[:, prompt_ids.shape[1]:])
    ended = (ours == eos).any(1)
    assert ended.any() and not ended.all()  # some rows end early, others run to max_new_tokens
    for row in ours:
        hits = (row == eos).nonzero().flatten()
        if len(hits):
            assert (row[hits[0] + 1:] == pad).all()


def test_hooks_send_the_model_through_its_own_forward(model) -> None:
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out)
    try:
        assert fast_gpt2.fused_model(model) is None
    finally:
        handle.remove()
    assert fast_gpt2.fused_model(model) is model


def test_the_fused_path_steps_aside(model, tok) -> None:
    assert fast_gpt2.fused_model(PolicyWithValue(model)) is None
    t5 = build_model(LMConfig(arch="t5", n_layer=1, n_embd=32, n_head=2), tok)
    assert fast_gpt2.fused_model(t5) is None
    compiled = build_model(LMConfig(n_layer=1, n_embd=32, n_head=2), tok)
    compiled.compile(dynamic=True)  # lazily: nothing is compiled until a call
    assert fast_gpt2.fused_model(compiled) is None
    dropout = build_model(LMConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.1), tok)
    assert fast_gpt2.fused_model(dropout.train()) is None and fast_gpt2.fused_model(dropout.eval()) is dropout
    # masks the layout does not describe (a hole in a response) go back to the model's own forward
    prompt_ids, pm, response_ids, rm, group = batch([3], [4], k=1)
    rm[0, 1] = 0
    assert fast_gpt2.grouped_logprobs(model, prompt_ids, pm, response_ids, rm, group) is None
    # top-k sampling keeps generate's warpers; the rollout's log-probs still equal a forward
    rollout = sample(model, tok, ["the cat", "one two"], 2, max_new_tokens=4, top_k=5, seed=0)
    again = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                             rollout.response_mask).logprobs
    torch.testing.assert_close(rollout.logprobs, again, atol=1e-5, rtol=0)
