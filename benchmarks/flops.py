"""flops: the machine's measured matmul peak, and the FLOP/s the DPO training steps reach as a share of it.

Peak: a few float32 (and bfloat16) ``torch.mm`` shapes on the benchmark's threads — square 1024³,
2048 × 1024 × 1024, and the 4 × 256 model's own projection shape (4096 × 256 → 768) — each timed over repeated
calls (2·m·k·n / median time) in every round, interleaved with the training steps; the peak is the best shape's
median over the rounds (its row: median and min–max seconds of one such matmul). On a shared virtual machine the
rate of one shape moves by ±30% from minute to minute, which is why it is measured alongside the steps.

Training steps: the ``rftlab`` and ``minimal`` DPO steps of :mod:`benchmarks.dpo_step` (16 pairs, the same data),
timed interleaved with the peak measurement. Their FLOPs are those each side actually EXECUTES per step, counted
from its tensor shapes with the usual rules (a matmul of m × k by k × n is 2mkn; backward costs twice the
forward; embedding lookups, norms and activations are not counted):

    forward = 2 · N_blocks · tokens + 2 · d · V · (LM-head rows) + 4 · L · d · (attention query × key pairs)

with N_blocks = 12 · L · d² (the projections of L blocks of width d), V = 1000.

- rftlab (fused GPT-2 path, counted from the layout it builds): tokens = the packed prompt tokens (once per
  pair) + response tokens but the last; LM-head rows = scored tokens; attention pairs = B·P·P for the padded
  prompt block + R·T'·(P + T') for the response block (sdpa computes masked entries too). Step = reference
  forward + policy forward and backward.
- minimal: tokens = 2B rows × the padded width W (padding included), LM-head rows = 2B·W, attention pairs =
  2B·W²; step = reference forward + policy forward and backward.

The same rftlab step therefore does fewer FLOPs than the minimal one for the same 16 pairs (shared prompt, no
padding, no unused logits); the table also gives the minimal loop's FLOPs over rftlab's time — the useful work
rate if rftlab did it the minimal way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks import common, dpo_step

NAME = "flops"
SHAPES = ((1024, 1024, 1024), (2048, 1024, 1024), (4096, 256, 768))


def matmul_rates(dtype: torch.dtype, seconds: float = 0.3, shapes=SHAPES) -> dict[tuple, float]:
    """GFLOP/s of each shape: 2·m·k·n over the median of repeated calls for about ``seconds``."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(2):
            a @ b
        times = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop or len(times) < 3:
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates[(m, k, n)] = 2 * m * k * n / statistics.median(times) / 1e9
    return rates


def _forward_flops(model, tokens: int, head_rows: int, attention_pairs: int) -> float:
    cfg = model.config
    n_blocks = 12 * cfg.n_layer * cfg.n_embd ** 2
    return 2 * n_blocks * tokens + 2 * cfg.n_embd * cfg.vocab_size * head_rows + 4 * cfg.n_layer * cfg.n_embd * \
        attention_pairs


def rftlab_step_flops(model, data) -> float:
    """Executed FLOPs of one rftlab DPO step (reference forward + policy forward and backward) on the fused path,
    counted from the layout it runs (``rftlab.rl.fast_gpt2``)."""
    from torch import nn

    from rftlab.rl import fast_gpt2

    width = max(data.chosen_ids.shape[1], data.rejected_ids.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]))

    n = len(data)
    responses = torch.cat([pad(data.chosen_ids), pad(data.rejected_ids)])
    masks = torch.cat([pad(data.chosen_mask), pad(data.rejected_mask)])
    lay = fast_gpt2._layout(data.prompt_ids, data.prompt_mask, responses, masks, torch.arange(n).repeat(2))
    b, p, t_in = lay.shape
    pairs = b * p * p + 2 * n * t_in * (p + t_in)
    return 4 * _forward_flops(model, len(lay.ids), len(lay.head_rows), pairs)


def minimal_step_flops(model, minimal: dpo_step.Minimal) -> float:
    """Executed FLOPs of one minimal DPO step: 2B padded rows through the reference (forward) and the policy
    (forward and backward)."""
    rows, width = minimal.ids.shape
    return 4 * _forward_flops(model, rows * width, rows * width, rows * width * width)


def run(sizes: list[str], precisions: list[str], rounds: int, steps: int, warmup: int,
        log: Callable[[str], None], peak_seconds: float = 0.3, peak_shapes=SHAPES) -> list[dict]:
    """Rows: matmul-peak (GFLOP/s) per precision, and the rftlab / minimal DPO steps' executed GFLOP/s."""
    from rftlab.models import frozen_copy

    texts = common.preference_texts(dpo_step.BATCH)
    prompts, chosen, rejected = dpo_step.encode(texts)
    data = dpo_step.preference_data(prompts, chosen, rejected)
    rows = []
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        samples: dict[tuple, list[float]] = {}  # shape → GFLOP/s of every timed round

        def peak(dtype: torch.dtype = dtype, samples: dict = samples) -> list[float]:
            start = time.perf_counter()
            for shape, rate in matmul_rates(dtype, peak_seconds, peak_shapes).items():
                samples.setdefault(shape, []).append(rate)
            return [time.perf_counter() - start]

        for size in sizes:
            label = f"{size}-{precision}"
            log(f"{NAME} {label}")
            initial = common.build_model(size)
            rft = dpo_step.Rftlab(common.clone(initial), frozen_copy(initial), data, precision)
            minimal = dpo_step.Minimal(common.clone(initial), frozen_copy(initial), prompts, chosen, rejected,
                                       precision)
            units = {"matmul-peak": peak, "rftlab": common.timed(rft.step, steps),
                     "minimal": common.timed(minimal.step, steps)}
            times = common.interleave(units, rounds, warmup, log)
            flops = {"rftlab": rftlab_step_flops(initial, data), "minimal": minimal_step_flops(initial, minimal)}
            for impl in ("rftlab", "minimal"):
                rows.append(common.row(NAME, label, impl, flops[impl] / 1e9, "GFLOP/s", times[impl]))
            rows.append(common.row(NAME, label, "rftlab-minimal-work", flops["minimal"] / 1e9, "GFLOP/s",
                                   times["rftlab"]))
        # the peak: the best shape's MEDIAN rate over all rounds (the steps are reported by their medians too)
        shape = max(samples, key=lambda s: statistics.median(samples[s]))
        rates, flop = samples[shape], 2 * shape[0] * shape[1] * shape[2] / 1e9
        best = statistics.median(rates)
        rows.append({"benchmark": NAME, "model": f"matmul-{precision}", "impl": "matmul-peak", "throughput": best,
                     "unit": "GFLOP/s", "median_s": flop / best, "min_s": flop / max(rates),
                     "max_s": flop / min(rates)})
    return rows
