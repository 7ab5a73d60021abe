"""Gradient-entanglement diagnostics: the hook-based fast method (and the torch.func one) against an autograd loop
— tied and untied heads, padding, parameter subsets, LoRA, both product forms —, a hand-computed inner product,
identical-response limits, unsupported modules and the per-token cosine matrix."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import rftlab.diagnostics as diagnostics
from rftlab.diagnostics import pair_gradient_stats, select_parameters, token_gradient_cosines
from rftlab.errors import RftlabError
from rftlab.models import LMConfig, build_model
from rftlab.tokenization import train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran far away from home", "hello world, again and again"]
NUMERIC = ["norm_chosen", "norm_rejected", "inner", "cosine", "rho_over_a", "rho_over_b", "logp_chosen",
           "logp_rejected"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's spinning makes this
    file ~6× slower; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def tiny(tok, n_layer: int = 2, seed: int = 0, attention: str = "eager"):
    torch.manual_seed(seed)
    return build_model(LMConfig(n_layer=n_layer, n_embd=32, n_head=2, attention=attention), tok)


def random_pairs(vocab: int, n: int, seed: int = 0) -> tuple[list[list[int]], ...]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))]

    return ([ids(1, 6) for _ in range(n)], [ids(1, 8) for _ in range(n)], [ids(1, 8) for _ in range(n)])


@pytest.mark.parametrize("n_layer", [1, 2])
def test_fast_matches_exact_with_padding(tok, n_layer: int) -> None:
    model = tiny(tok, n_layer, seed=n_layer)
    prompts, chosen, rejected = random_pairs(len(tok), 7, seed=n_layer)
    assert len({len(p) for p in prompts}) > 1 and len({len(r) for r in chosen + rejected}) > 1  # padding happens
    exact = pair_gradient_stats(model, prompts, chosen, rejected, method="exact")
    fast = pair_gradient_stats(model, prompts, chosen, rejected, method="fast", chunk_size=4)  # 4 chunks, last short
    np.testing.assert_allclose(fast[NUMERIC].to_numpy(), exact[NUMERIC].to_numpy(), rtol=1e-4, atol=1e-6)
    assert list(fast["regime"]) == list(exact["regime"])
    assert (exact["norm_chosen"] > 0).all() and (exact["cosine"].abs() <= 1 + 1e-9).all()
    np.testing.assert_allclose(exact["rho_over_a"], exact["inner"] / exact["norm_chosen"] ** 2, rtol=1e-12)
    assert model.training  # mode restored


def test_fast_restores_sdpa_and_matches_exact(tok) -> None:
    model = tiny(tok, 1, attention="sdpa")
    prompts, chosen, rejected = random_pairs(len(tok), 3, seed=5)
    fast = pair_gradient_stats(model, prompts, chosen, rejected, method="fast")
    assert model.config._attn_implementation == "sdpa"
    exact = pair_gradient_stats(model, prompts, chosen, rejected, method="exact")
    np.testing.assert_allclose(fast[NUMERIC].to_numpy(), exact[NUMERIC].to_numpy(), rtol=1e-4, atol=1e-6)


def test_inner_product_against_direct_autograd(tok) -> None:
    model = tiny(tok, 1, seed=3)
    x, y_w, y_l = [5, 17, 40], [8, 9, 100, 3], [60, 61]
    params = [p for p in model.parameters() if p.requires_grad]

    def direct(y: list[int]) -> tuple[torch.Tensor, float]:
        ids = torch.tensor([x + y])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(x) - 1: -1], -1)
        total = logp.gather(-1, torch.tensor(y)[:, None]).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)]), total.item()

    g_w, x_w = direct(y_w)
    g_l, x_l = direct(y_l)
    stats = pair_gradient_stats(model, [x], [y_w], [y_l], method="fast")
    row = stats.iloc[0]
    assert row["inner"] == pytest.approx((g_w @ g_l).item(), rel=1e-4)
    assert row["norm_chosen"] == pytest.approx(g_w.norm().item(), rel=1e-5)
    assert row["norm_rejected"] == pytest.approx(g_l.norm().item(), rel=1e-5)
    assert row["logp_chosen"] == pytest.approx(x_w, rel=1e-5)
    assert row["logp_rejected"] == pytest.approx(x_l, rel=1e-5)
    a, b, rho = (g_w @ g_w).item(), (g_l @ g_l).item(), (g_w @ g_l).item()
    expected = {(False, False): "ideal", (True, False): "chosen_down", (False, True): "rejected_up"}[(rho > a, rho > b)]
    assert row["regime"] == expected


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_identical_responses_give_cosine_one_and_both(tok, method: str) -> None:
    model = tiny(tok, 1, seed=4)
    prompts, chosen, _ = random_pairs(len(tok), 3, seed=7)
    stats = pair_gradient_stats(model, prompts, chosen, chosen, method=method)
    np.testing.assert_allclose(stats["cosine"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["rho_over_a"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["norm_chosen"], stats["norm_rejected"], rtol=1e-6)
    assert (stats["regime"] == "both").all()


def test_parameter_subsets(tok) -> None:
    model = tiny(tok, 2, seed=6)
    prompts, chosen, rejected = random_pairs(len(tok), 4, seed=8)
    full = pair_gradient_stats(model, prompts, chosen, rejected, params="all")
    last = pair_gradient_stats(model, prompts, chosen, rejected, params="last")
    emb = pair_gradient_stats(model, prompts, chosen, rejected, params="embeddings")
    assert (last["norm_chosen"] < full["norm_chosen"]).all() and (last["norm_rejected"] < full["norm_rejected"]).all()
    # squared norms add over disjoint parameter sets: embeddings ∪ last ⊂ all (2 blocks: block 0 is in neither)
    assert ((emb["norm_chosen"] ** 2 + last["norm_chosen"] ** 2) < full["norm_chosen"] ** 2).all()
    names = set(select_parameters(model, "last"))
    assert "transformer.h.1.attn.c_attn.weight" in names and "transformer.ln_f.weight" in names
    assert not any(n.startswith("transformer.h.0.") for n in names)
    assert set(select_parameters(model, "embeddings")) == {"transformer.wte.weight", "transformer.wpe.weight"}
    only_wte = pair_gradient_stats(model, prompts, chosen, rejected, params=lambda n: n == "transformer.wte.weight",
                                   method="exact")
    assert (only_wte["norm_chosen"] < emb["norm_chosen"] + 1e-6).all()
    with pytest.raises(RftlabError, match="selects no trainable"):
        select_parameters(model, "lora")
    model.requires_grad_(False)
    with pytest.raises(RftlabError, match="selects no trainable"):
        select_parameters(model, "all")


def test_token_gradient_cosines(tok) -> None:
    model = tiny(tok, 1, seed=9)
    x, y = [4, 5, 6], [10, 11, 12, 13]
    same = token_gradient_cosines(model, x, y, y)
    assert same.shape == (4, 4)
    np.testing.assert_allclose(np.diag(same), 1.0, rtol=1e-6)
    np.testing.assert_allclose(same, same.T, atol=1e-6)
    other = token_gradient_cosines(model, x, y, [20, 21])
    assert other.shape == (4, 2) and np.all(np.abs(other) <= 1 + 1e-9)
    # the first token's gradient only depends on (x, y_1): equal first tokens → cosine 1 at [0, 0]
    assert token_gradient_cosines(model, x, [10, 30], [10, 40, 41])[0, 0] == pytest.approx(1.0, rel=1e-6)


def test_input_errors(tok) -> None:
    model = tiny(tok, 1)
    with pytest.raises(RftlabError, match="prompts"):
        pair_gradient_stats(model, [[1]], [[2]], [[3], [4]])
    with pytest.raises(RftlabError, match="method"):
        pair_gradient_stats(model, [[1]], [[2]], [[3]], method="slow")
    with pytest.raises(RftlabError, match="at least one token"):
        pair_gradient_stats(model, [[1]], [[]], [[3]])


def test_lora_parameters_fast_matches_exact(tok) -> None:
    from rftlab.models import add_lora

    model = add_lora(tiny(tok, 1, seed=11), r=4, dropout=0.0)
    with torch.no_grad():  # peft starts lora_B at 0 (lora_A's gradient would vanish): give it a value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    names = set(select_parameters(model, "lora"))
    assert names and all("lora_" in n for n in names)
    prompts, chosen, rejected = random_pairs(len(tok), 4, seed=12)
    exact = pair_gradient_stats(model, prompts, chosen, rejected, params="lora", method="exact")
    fast = pair_gradient_stats(model, prompts, chosen, rejected, params="lora", method="fast")
    np.testing.assert_allclose(fast[NUMERIC].to_numpy(), exact[NUMERIC].to_numpy(), rtol=1e-4, atol=1e-6)
    # the base model is frozen by add_lora, so "all" is the adapters too
    np.testing.assert_allclose(pair_gradient_stats(model, prompts, chosen, rejected)["inner"], fast["inner"], rtol=1e-6)


def test_seq2seq_exact_only(tok) -> None:
    torch.manual_seed(13)
    model = build_model(LMConfig(arch="t5", n_layer=1, n_embd=32, n_head=2, attention="eager"), tok)
    prompts, chosen, rejected = random_pairs(len(tok), 3, seed=14)
    exact = pair_gradient_stats(model, prompts, chosen, chosen, method="exact")
    np.testing.assert_allclose(exact["cosine"], 1.0, rtol=1e-6)
    assert np.isfinite(exact[NUMERIC].to_numpy()).all() and (exact["regime"] == "both").all()
    for method in ("fast", "func"):
        with pytest.raises(RftlabError, match="causal models only"):
            pair_gradient_stats(model, prompts, chosen, rejected, method=method)


def assert_matches(fast, exact) -> None:
    np.testing.assert_allclose(fast[NUMERIC].to_numpy(), exact[NUMERIC].to_numpy(), rtol=1e-4, atol=1e-6)
    assert list(fast["regime"]) == list(exact["regime"])


@pytest.mark.parametrize(("params", "products"), [("all", None), ("all", "gram"), ("all", "materialise"),
                                                  ("last", None), ("embeddings", "gram"),
                                                  ("embeddings", "materialise"), ("wte_and_ln", None),
                                                  ("attn", None)])
def test_fast_matches_exact_tied_head(tok, monkeypatch, params: str, products: str | None) -> None:
    """GPT-2 ties lm_head.weight to wte.weight: its gradient has an embedding and a head part (cross terms)."""
    model = tiny(tok, 2, seed=21)
    assert model.lm_head.weight is model.transformer.wte.weight
    spec = {"wte_and_ln": lambda n: n == "transformer.wte.weight" or ".ln_" in n,
            "attn": lambda n: ".attn." in n}.get(params, params)
    prompts, chosen, rejected = random_pairs(len(tok), 5, seed=22)
    prompts[0] = prompts[0] + [7] * 8  # a long prompt: the others are left-padded further
    chosen[1] = chosen[1] + [9] * 10  # a long response: right padding for the rest
    monkeypatch.setattr(diagnostics, "_FORCE_PRODUCTS", products)
    exact = pair_gradient_stats(model, prompts, chosen, rejected, params=spec, method="exact")
    fast = pair_gradient_stats(model, prompts, chosen, rejected, params=spec, method="fast", chunk_size=4)
    assert_matches(fast, exact)
    assert model.training


def test_fast_matches_exact_untied_head_and_func(tok) -> None:
    model = tiny(tok, 1, seed=23)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.05 * torch.randn_like(
        model.lm_head.weight))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert "lm_head.weight" in select_parameters(model, "last")
    prompts, chosen, rejected = random_pairs(len(tok), 4, seed=24)
    for params in ("last", "all"):
        exact = pair_gradient_stats(model, prompts, chosen, rejected, params=params, method="exact")
        assert_matches(pair_gradient_stats(model, prompts, chosen, rejected, params=params), exact)
    assert_matches(pair_gradient_stats(model, prompts, chosen, rejected, method="func", chunk_size=4), exact)  # all


def test_fast_lora_with_trainable_head(tok) -> None:
    """Adapters (nn.Linear inside peft's Conv1D wrapper) together with a trainable final norm and tied embedding."""
    from rftlab.models import add_lora

    model = add_lora(tiny(tok, 2, seed=25), r=2, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
        if "ln_f" in name or "wte" in name:
            p.requires_grad_(True)
    prompts, chosen, rejected = random_pairs(len(tok), 3, seed=26)
    for params in ("all", "lora"):
        exact = pair_gradient_stats(model, prompts, chosen, rejected, params=params, method="exact")
        assert_matches(pair_gradient_stats(model, prompts, chosen, rejected, params=params), exact)


class Scale(torch.nn.Module):
    """y = x ∘ w: a module with a parameter and no per-example rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class OffsetRMSNorm(torch.nn.RMSNorm):
    """Gemma's form y = x̂ ∘ (1 + w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.normalized_shape, eps=self.eps) * (1 + self.weight)


class MeanCentredRMSNorm(torch.nn.RMSNorm):
    """Named like an RMS norm, computes something else: the fast rule must not apply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - x.mean(-1, keepdim=True))


def test_fast_rejects_unsupported_modules(tok) -> None:
    model = tiny(tok, 1, seed=27)
    model.transformer.ln_f = Scale(32)  # no per-example rule
    prompts, chosen, rejected = random_pairs(len(tok), 2, seed=28)
    with pytest.raises(RftlabError, match="Scale.*method='exact'"):
        pair_gradient_stats(model, prompts, chosen, rejected)
    # not selected: nothing to hook there, so the fast method runs and agrees with the oracle
    spec = "embeddings"
    assert_matches(pair_gradient_stats(model, prompts, chosen, rejected, params=spec),
                   pair_gradient_stats(model, prompts, chosen, rejected, params=spec, method="exact"))
    assert model.training


@pytest.mark.parametrize("norm", [torch.nn.RMSNorm, OffsetRMSNorm])
def test_fast_matches_exact_with_rms_norms(tok, norm) -> None:
    model = tiny(tok, 2, seed=31)
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_1 = norm(32, eps=1e-5)
            block.ln_1.weight.uniform_(0.5, 1.5)  # a weight that differs from its initial value
        model.transformer.ln_f = norm(32)  # eps None: torch's float32 epsilon
    prompts, chosen, rejected = random_pairs(len(tok), 5, seed=32)
    for params in ("all", lambda name: "ln_" in name):  # the norm weights alone: their rule is not drowned out
        exact = pair_gradient_stats(model, prompts, chosen, rejected, params=params, method="exact")
        assert_matches(pair_gradient_stats(model, prompts, chosen, rejected, params=params, chunk_size=4), exact)


def test_fast_matches_exact_on_a_llama(tok) -> None:
    """transformers' LlamaRMSNorm (variance_epsilon), rotary positions, an untied head: every parameter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(33)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                         attn_implementation="eager"))
    prompts, chosen, rejected = random_pairs(len(tok), 5, seed=34)
    for params in ("all", lambda name: "norm" in name):
        exact = pair_gradient_stats(model, prompts, chosen, rejected, params=params, method="exact")
        assert_matches(pair_gradient_stats(model, prompts, chosen, rejected, params=params, chunk_size=4), exact)


def test_fast_refuses_a_norm_that_only_looks_like_rms(tok) -> None:
    model = tiny(tok, 1, seed=35)
    model.transformer.ln_f = MeanCentredRMSNorm(32)
    prompts, chosen, rejected = random_pairs(len(tok), 2, seed=36)
    with pytest.raises(RftlabError, match="MeanCentredRMSNorm is neither .*method='exact'"):
        pair_gradient_stats(model, prompts, chosen, rejected)
