"""pair-grad-stats: per-pair gradient statistics, the hook-based ``fast`` method vs the ``exact`` loop vs a floor.

    python -m benchmarks.pair_grad_stats [--quick] [--rounds 3] [--threads 2]    (or: rftlab bench pair-grad-stats)

Model: the benchmarks' GPT-2s (:func:`benchmarks.common.build_model`, vocabulary 1000, tied embeddings):
4 layers × 256 and 2 layers × 128. Inputs: 64 preference pairs of random token ids, 32-token prompts and
32-token chosen and rejected responses (``--quick``: 8 pairs on the 2 × 128 model). ``params="all"``.

- fast: ``pair_gradient_stats(method="fast")`` — one batched forward and one backward per chunk of pairs;
- exact-loop: ``pair_gradient_stats(method="exact")`` — one forward and one autograd.grad per response (the
  per-response backward loop of the official code);
- floor: one plain batched forward + backward (``.backward()`` of the summed log-probs, parameter
  gradients accumulated, no hooks) over the same 2 × pairs sequences — what any per-example method must pay.

Timed interleaved (fast, exact-loop, floor, fast, …) for ``--rounds`` rounds after one warm-up round, so load
drift on the machine hits all of them alike; rows report medians (min–max) in pairs/s.
"""

from __future__ import annotations

import argparse
import random

import torch

from benchmarks import common

NAME = "pair-grad-stats"
MODELS = ("4x256", "2x128")


def make_model(name: str):
    return common.build_model(name)


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
                chunk_size: int = 32, warmup: int = 1, log=None) -> list[dict]:
    from rftlab.diagnostics import pair_gradient_stats

    model = make_model(name).eval()
    prompts, chosen, rejected = make_pairs(n_pairs, prompt_len, response_len, common.VOCAB)
    impls = {
        "fast": lambda: pair_gradient_stats(model, prompts, chosen, rejected, method="fast", chunk_size=chunk_size),
        "exact-loop": lambda: pair_gradient_stats(model, prompts, chosen, rejected, method="exact"),
        "floor": lambda: floor_step(model, prompts, chosen, rejected),
    }
    times = common.interleave({k: common.timed(fn) for k, fn in impls.items()}, rounds, warmup, log)
    return [common.row(NAME, f"{name}-fp32", key, n_pairs, "pairs/s", ts) for key, ts in times.items()]


def run(sizes: tuple[str, ...] = MODELS, rounds: int = 3, warmup: int = 1, log=None, n_pairs: int = 64) -> list[dict]:
    """Benchmark rows (benchmark, model, impl, throughput in pairs/s, unit, median_s, min_s, max_s)."""
    out = []
    for name in sizes:
        if log is not None:
            log(f"{NAME} {name}-fp32")
        out += bench_model(name, n_pairs=n_pairs, rounds=rounds, warmup=warmup, log=log)
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} {'impl':<10} {'median s':>9} {'min–max s':>15} {'pairs/s':>9}"]
    for row in rows:
        lines.append(f"{row['model']:<12} {row['impl']:<10} {row['median_s']:9.3f} "
                     f"{row['min_s']:7.3f}–{row['max_s']:<7.3f} {row['throughput']:9.1f}")
    for model in dict.fromkeys(row["model"] for row in rows):
        t = {row["impl"]: row["median_s"] for row in rows if row["model"] == model}
        lines.append(f"{model}: exact-loop/fast = {t['exact-loop'] / t['fast']:.2f}×, "
                     f"fast/floor = {t['fast'] / t['floor']:.2f}×")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 pairs on the 2 × 128 model (a smoke check)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch thread(s); 32-token prompts, 32-token responses, params='all'")
    rows = run(("2x128",), rounds=args.rounds, n_pairs=8) if args.quick else run(rounds=args.rounds)
    print(format_table(rows))


if __name__ == "__main__":
    main()
