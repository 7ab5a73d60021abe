"""Per-pair gradient statistics: the hook-based ``fast`` method vs the ``exact`` autograd loop vs a floor.

    python -m benchmarks.pair_grad_stats [--quick] [--rounds 3] [--threads 1]

Model: a randomly initialised GPT-2 (tied input/output embeddings, vocabulary 1000) built with
:func:`rftlab.models.build_model` from a stub tokenizer (no training, no downloads); 4 layers × 256 (4 heads)
and 2 layers × 128. Inputs: 64 preference pairs of random token ids, 32-token prompts and 32-token chosen and
rejected responses (``--quick``: 8 pairs, the 2 × 128 model only). ``params="all"``.

- fast: ``pair_gradient_stats(method="fast")`` — one batched forward and one backward per chunk of pairs;
- exact: ``pair_gradient_stats(method="exact")`` — one forward and one autograd.grad per response;
- floor: one plain batched forward + backward (``.backward()`` of the summed log-probs, parameter
  gradients accumulated, no hooks) over the same 2 × pairs sequences — what any per-example method must pay.

The three are timed interleaved (fast, exact, floor, fast, …) for ``--rounds`` rounds after one warm-up
round, so load drift on the machine hits all of them alike; the table reports medians (min–max). One torch
thread by default (as ``benchmarks.sampling``: on a small shared machine two threads are noisier).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

MODELS = {"gpt2-4x256": (4, 256, 4), "gpt2-2x128": (2, 128, 4)}


class StubTokenizer:
    """What :func:`rftlab.models.build_model` reads from a tokenizer: its size and special ids."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 1

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def make_model(name: str, vocab: int = 1000):
    from rftlab.models import LMConfig, build_model

    n_layer, n_embd, n_head = MODELS[name]
    torch.manual_seed(0)
    return build_model(LMConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=128), StubTokenizer(vocab))


def make_pairs(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> tuple[list, list, list]:
    rng = random.Random(seed)

    def ids(length: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(length)]

    return ([ids(prompt_len) for _ in range(n)], [ids(response_len) for _ in range(n)],
            [ids(response_len) for _ in range(n)])


def floor_step(model, prompts, chosen, rejected) -> None:
    """One batched forward + backward of Σ log π(y|x) over all 2 × pairs sequences, no hooks."""
    from rftlab.diagnostics import _pad_batch, _token_logprobs

    batch = _pad_batch(list(prompts) * 2, list(chosen) + list(rejected), 0, False, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    _token_logprobs(model, *batch).sum().backward()
    model.zero_grad(set_to_none=True)


def bench_model(name: str, n_pairs: int, rounds: int, prompt_len: int = 32, response_len: int = 32,
                chunk_size: int = 32) -> list[dict]:
    from rftlab.diagnostics import pair_gradient_stats

    model = make_model(name).eval()
    prompts, chosen, rejected = make_pairs(n_pairs, prompt_len, response_len, 1000)
    impls = {
        "fast": lambda: pair_gradient_stats(model, prompts, chosen, rejected, method="fast", chunk_size=chunk_size),
        "exact": lambda: pair_gradient_stats(model, prompts, chosen, rejected, method="exact"),
        "floor": lambda: floor_step(model, prompts, chosen, rejected),
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for key, fn in impls.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r:
                times[key].append(elapsed)
    rows = []
    for key, ts in times.items():
        median = statistics.median(ts)
        rows.append(dict(benchmark="pair_grad_stats", model=name, impl=key, throughput=n_pairs / median,
                         unit="pairs/s", median_s=median, min_s=min(ts), max_s=max(ts)))
    return rows


def run(quick: bool = False, rounds: int = 3) -> list[dict]:
    """Benchmark rows (benchmark, model, impl, throughput in pairs/s, unit, median_s, min_s, max_s)."""
    if quick:
        return bench_model("gpt2-2x128", n_pairs=8, rounds=max(1, min(rounds, 3)))
    return [row for name in MODELS for row in bench_model(name, n_pairs=64, rounds=rounds)]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} {'impl':<6} {'median s':>9} {'min–max s':>15} {'pairs/s':>9}"]
    for row in rows:
        lines.append(f"{row['model']:<12} {row['impl']:<6} {row['median_s']:9.3f} "
                     f"{row['min_s']:7.3f}–{row['max_s']:<7.3f} {row['throughput']:9.1f}")
    for model in dict.fromkeys(row["model"] for row in rows):
        t = {row["impl"]: row["median_s"] for row in rows if row["model"] == model}
        lines.append(f"{model}: exact/fast = {t['exact'] / t['fast']:.2f}×, fast/floor = {t['fast'] / t['floor']:.2f}×")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 pairs on the 2 × 128 model (a smoke check)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch thread(s); 32-token prompts, 32-token responses, params='all'")
    print(format_table(run(quick=args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
