"""reward-std: per-input reward statistics (K samples per input, their reward mean and std) — rftlab's batched
sampler vs a plain per-input ``generate`` loop, in one process.

    python -m benchmarks.sampling [--prompts 500] [--k 10] [--new-tokens 32]    (or: rftlab bench reward-std)

Policy: the benchmarks' randomly initialised 2 × 128 GPT-2 with the 1000-token byte-level BPE trained on
CPython's ``pydoc_data.topics`` (no downloads). Prompts are the first 16 tokens of successive help paragraphs.
``min_new_tokens`` = ``max_new_tokens`` fixes every response length, so both sides produce exactly the same
number of tokens. Reward: the share of a completion's letters that are "e" (:func:`benchmarks.common.count_e`).

- rftlab: :func:`rftlab.rl.train.per_input_rewards` (``sample`` in chunks of ``--batch-size`` prompts — on a
  GPT-2 the fused sampler: each prompt prefilled once, a preallocated KV cache; no log-prob scoring, since only
  the texts are read), decode, score, then the per-input mean and std of the (N, K) rewards;
- per-input-loop: for each prompt, ``model.generate(num_return_sequences=K)``, decode, score, mean and std —
  timed on the first ``--reference-prompts`` prompts and scaled linearly to all of them.

Throughput: inputs per second (N / time; the per-input loop's scaled time). The two sides are timed
interleaved for ``--rounds`` rounds after a small warm-up of each.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks import common

NAME = "reward-std"


def corpus() -> list[str]:
    """Paragraphs of CPython's bundled help text (ships with every Python, ~1 MB)."""
    return list(common.corpus())


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


def rftlab_stats(model, prompts: list[str], k: int, new_tokens: int, batch_size: int,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rftlab's per-input statistics: rewards (N, K), their mean (N,) and unbiased std (N,)."""
    from rftlab.rl.train import per_input_rewards

    rewards, _ = per_input_rewards(model, common.tokenizer(), prompts, common.count_e, k,
                                   {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens},
                                   seed=seed, batch_size=batch_size)
    return rewards, rewards.mean(1), rewards.std(1, ddof=1)


def loop_stats(model, prompts: list[str], k: int, new_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain way: one ``generate`` call per input, then its K rewards' mean and std."""
    tok = common.tokenizer()
    rewards = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")
            out = model.generate(**ids, do_sample=True, num_return_sequences=k, top_k=0, top_p=1.0, use_cache=True,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, ids["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
            rewards.append(common.count_e([0] * k, texts))
    rewards = np.asarray(rewards)
    return rewards, rewards.mean(1), rewards.std(1, ddof=1)


def run(size: str = "2x128", n_prompts: int = 500, k: int = 10, new_tokens: int = 32, reference_prompts: int = 50,
        batch_size: int = 64, rounds: int = 2, warmup: int = 0, log=None, prompt_tokens: int = 16) -> list[dict]:
    """Rows: rftlab and per-input-loop, inputs/s (the loop timed on ``reference_prompts`` and scaled to all)."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # the loop's one-time "pass an attention_mask" notice
    tok = common.tokenizer()
    model = common.build_model(size)
    prompts = make_prompts(tok, corpus(), n_prompts, prompt_tokens)
    scale = n_prompts / reference_prompts
    # warm-up of both paths (allocator, first-call overheads)
    rftlab_stats(model, prompts[:4], k, new_tokens, batch_size)
    loop_stats(model, prompts[:1], k, new_tokens)
    units = {
        "rftlab": common.timed(lambda: rftlab_stats(model, prompts, k, new_tokens, batch_size)),
        "per-input-loop": lambda: [t * scale for t in common.timed(
            lambda: loop_stats(model, prompts[:reference_prompts], k, new_tokens))()],
    }
    if log is not None:
        log(f"{NAME} {size}-fp32: {n_prompts} inputs × {k} samples × {new_tokens} tokens "
            f"(per-input loop timed on {reference_prompts}, ×{scale:g})")
    times = common.interleave(units, rounds, warmup, log)
    return [common.row(NAME, f"{size}-fp32", impl, n_prompts, "inputs/s", t) for impl, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500, help="inputs")
    parser.add_argument("--k", type=int, default=10, help="samples per input")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per sample (min = max)")
    parser.add_argument("--reference-prompts", type=int, default=50, help="inputs timed in the per-input loop")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per sampling chunk (rftlab)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(n_prompts=args.prompts, k=args.k, new_tokens=args.new_tokens, reference_prompts=args.reference_prompts,
               batch_size=args.batch_size, rounds=args.rounds, log=print)
    for r in rows:
        print(f"{r['impl']:<15} {r['median_s']:8.2f} s  {r['throughput']:8.1f} {r['unit']}")
    t = {r["impl"]: r["median_s"] for r in rows}
    print(f"speed-up: {t['per-input-loop'] / t['rftlab']:.1f}×")


if __name__ == "__main__":
    main()
