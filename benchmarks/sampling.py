"""Batched K-sample generation vs a plain per-input ``generate`` loop, in one process.

    python -m benchmarks.sampling [--prompts 500] [--k 10] [--new-tokens 32] [--reference-prompts 50]

Policy: a randomly initialised 2-layer × 128 GPT-2 with a 1000-token byte-level BPE trained on CPython's
``pydoc_data.topics`` (no downloads). Prompts are ≈16-token windows of that text. ``min_new_tokens`` =
``max_new_tokens`` fixes every response length, so both paths produce exactly the same number of tokens.

- batched: :func:`rftlab.rl.sampling.sample` — one ``generate(num_return_sequences=K)`` per chunk of
  ``--batch-size`` prompts, plus the batched forward that scores every token's log-prob (included in its time);
- reference: ``model.generate(num_return_sequences=K)`` once per prompt (no scoring), timed on the first
  ``--reference-prompts`` prompts and scaled linearly to all of them.

One thread by default: on a small shared machine a model this size runs fastest on one, and with two threads
under load OpenMP's spinning workers slow both paths by 5–50× and swamp the comparison. 32 prompts (320
sequences) per call was the fastest chunk on 2 CPU cores (20: 26 s, 32: 24 s, 50: 27 s, 250: 36 s).
"""

from __future__ import annotations

import argparse
import time

import torch


def corpus() -> list[str]:
    """Paragraphs of CPython's bundled help text (ships with every Python, ~1 MB)."""
    from pydoc_data.topics import topics

    return [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]


def make_prompts(tokenizer, texts: list[str], n: int, length: int) -> list[str]:
    """``n`` prompts of ≈``length`` tokens: the first ``length`` tokens of successive paragraphs, decoded."""
    prompts = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            prompts.append(tokenizer.decode(ids[:length]))
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"corpus has only {len(prompts)} paragraphs of ≥ {length} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500, help="prompts sampled by the batched path")
    parser.add_argument("--k", type=int, default=10, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per sample (min = max)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="approximate prompt length")
    parser.add_argument("--reference-prompts", type=int, default=50, help="prompts timed in the per-input loop")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (batched path)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()

    from rftlab.models import LMConfig, build_model
    from rftlab.rl.sampling import response_logprobs, sample
    from rftlab.tokenization import train_bpe_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()  # the reference loop's one-time "pass an attention_mask" notice
    texts = corpus()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=1000)
    torch.manual_seed(0)
    model = build_model(LMConfig(arch="gpt2", n_layer=2, n_embd=128, n_head=4, n_positions=128), tokenizer).eval()
    prompts = make_prompts(tokenizer, texts, args.prompts, args.prompt_tokens)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {model.config.n_layer}×{model.config.n_embd}, vocab {len(tokenizer)}, {n_params / 1e6:.2f}M "
          f"params, {torch.get_num_threads()} threads; {len(prompts)} prompts of {min(lengths)}–{max(lengths)} "
          f"tokens (mean {sum(lengths) / len(lengths):.1f}) × K={args.k} × {args.new_tokens} new tokens")

    sample(model, tokenizer, prompts[:4], args.k, seed=0, **gen)  # warm-up (allocator, first-call overheads)

    start = time.perf_counter()
    rollout = sample(model, tokenizer, prompts, args.k, seed=0, batch_size=args.batch_size, **gen)
    batched_s = time.perf_counter() - start
    batched_tokens = int(rollout.response_mask.sum())
    assert batched_tokens == len(prompts) * args.k * args.new_tokens, batched_tokens

    # the scoring share of the batched time: the same forward again, over the same chunks of rows
    rows = args.batch_size * args.k
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(rollout), rows):
            part = slice(i, i + rows)
            response_logprobs(model, rollout.prompt_ids[part], rollout.prompt_mask[part],
                              rollout.response_ids[part], rollout.response_mask[part])
    scoring_s = time.perf_counter() - start

    reference = prompts[: args.reference_prompts]
    torch.manual_seed(0)
    start = time.perf_counter()
    reference_tokens = 0
    with torch.no_grad():
        for prompt in reference:  # the plain way: one generate call per input
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, do_sample=True, num_return_sequences=args.k, top_k=0, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **gen)
            reference_tokens += out[:, ids["input_ids"].shape[1]:].numel()
    reference_s = (time.perf_counter() - start) * len(prompts) / len(reference)
    reference_tokens = reference_tokens * len(prompts) // len(reference)

    batched_rate, reference_rate = batched_tokens / batched_s, reference_tokens / reference_s
    print(f"batched sample (batch_size={args.batch_size}, incl. log-prob scoring): {batched_s:7.2f} s "
          f"{batched_rate:9.0f} tokens/s")
    print(f"  of which log-prob scoring ≈ {scoring_s:.2f} s; generation alone {batched_s - scoring_s:.2f} s "
          f"{batched_tokens / (batched_s - scoring_s):9.0f} tokens/s")
    print(f"per-input generate loop (timed on {len(reference)} prompts, ×{len(prompts) / len(reference):g}): "
          f"{reference_s:7.2f} s {reference_rate:9.0f} tokens/s")
    print(f"speed-up: {batched_rate / reference_rate:.1f}× with scoring, "
          f"{reference_s / (batched_s - scoring_s):.1f}× generation alone ({batched_tokens} tokens each)")


if __name__ == "__main__":
    main()
