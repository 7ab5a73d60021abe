"""Theorem 1 of Razin et al. (ICLR 2024), checked exactly: ‖∇V(x;θ)‖ ≤ 6·L·γ(x;θ)·STD[r(x,·)]^(2/3).

Tiny autoregressive softmax policies (an MLP over the input and the prefix, vocabulary V, output
length L = 1..4) are trained by cross-entropy towards one planted output per input: the worst output
for a third of the inputs ("confidently wrong"), a random one for a third, the best for the rest.
At several points of that training and at several sampling temperatures, every output is enumerated
to get the exact expected reward V(x), its standard deviation, the exact gradient norm ‖∇_θ V(x)‖ and
γ(x) (the largest spectral norm of the logits' Jacobian over all prefixes). Rewards are uniform in
[-1, 1]. The claim: every input satisfies the bound, so inputs with tiny reward std get tiny gradients
even when their expected reward is far from the best achievable.

CPU runtime of the default preset: about 15 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rftlab.registry import experiment

METRICS = {
    "output_len": "L, the number of generated tokens",
    "n_points": "number of (input, snapshot, temperature) points checked for that L",
    "max_bound_ratio": "max over points of ‖∇V‖ / (6·L·γ·STD^(2/3)); the theorem says ≤ 1",
    "max_single_token_ratio": "max over points of ‖∇V‖ / (γ·STD); ≤ 1 is proven for L = 1 only",
    "frac_small_std": "share of points with reward std < 0.01",
    "inputs.parquet": "one row per (L, pretraining step, temperature, input): reward_mean, reward_std, "
    "reward_max, grad_norm, gamma, bound, bound_ratio, target_kind",
}


@experiment(name="theorem-bound", paper="Razin et al. 2024", figure="Theorem 1 (§3)", version=1,
            cpu_runtime="~15 s")
@dataclass(frozen=True)
class Config:
    vocab_size: int = 4  # |V|, the policy's vocabulary
    output_lens: tuple[int, ...] = (1, 2, 3, 4)  # L values; one policy per L (V**L outputs enumerated)
    n_inputs: int = 12  # number of inputs x
    hidden: int = 32  # MLP width of f_θ
    temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)  # sampling temperatures τ (logits f/τ)
    snapshot_steps: tuple[int, ...] = (0, 20, 100, 400)  # cross-entropy steps at which points are taken
    lr: float = 0.03  # Adam learning rate of the cross-entropy training
    seed: int = 0  # seeds rewards, targets and initialisation
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or any(not 1 <= n <= 6 for n in self.output_lens):
            raise ValueError("vocab_size must be ≥ 2 and every output length in 1..6")
        if self.vocab_size ** max(self.output_lens) > 5000:
            raise ValueError("vocab_size ** max(output_lens) must be ≤ 5000 to enumerate all outputs")


def run(cfg: Config, run) -> None:
    import pandas as pd
    import torch

    from rftlab import enumerable, runtime

    runtime.set_threads(cfg.threads)
    steps = sorted(set(cfg.snapshot_steps))
    # Resume: a checkpoint is saved after each output length, with the tables of the lengths done.
    # Each length reseeds from cfg.seed, so skipping the finished ones gives the same results.
    state = run.load_checkpoint() or {"lengths_done": 0, "tables": []}
    tables = [_table_from_state(t) for t in state["tables"]]  # one DataFrame per finished length
    if state["lengths_done"]:
        run.info(f"resuming after output lengths {list(cfg.output_lens[:state['lengths_done']])}")
    with run.progress(len(cfg.output_lens) * len(steps), "theorem-bound") as bar:
        bar.advance(state["lengths_done"] * len(steps))
        for index, length in enumerate(cfg.output_lens):
            if index < state["lengths_done"]:
                continue
            runtime.seed_everything(cfg.seed * 1000 + length)
            outputs = enumerable.all_outputs(cfg.vocab_size, length)
            x = torch.arange(cfg.n_inputs)
            rewards = torch.rand(cfg.n_inputs, outputs.shape[0]) * 2 - 1
            kind = torch.arange(cfg.n_inputs) % 3  # 0: worst output, 1: random output, 2: best output
            targets = torch.where(kind == 0, rewards.argmin(1),
                                  torch.where(kind == 1, torch.randint(outputs.shape[0], (cfg.n_inputs,)),
                                              rewards.argmax(1)))
            policy = enumerable.PrefixMLPPolicy(cfg.n_inputs, cfg.vocab_size, length, cfg.hidden)
            optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
            done, rows = 0, []
            for step in steps:
                for _ in range(step - done):  # cross-entropy towards the planted outputs
                    logp = enumerable.sequence_logprobs(policy, x, outputs, 1.0)
                    loss = -logp.gather(1, targets[:, None]).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                done = step
                for tau in cfg.temperatures:
                    with torch.no_grad():
                        mean, std = enumerable.value_and_std(
                            enumerable.sequence_logprobs(policy, x, outputs, tau), rewards)
                    grad = enumerable.value_grad_norms(policy, x, outputs, rewards, tau).detach()
                    gam = enumerable.gamma(policy, x, cfg.vocab_size, length, tau)
                    bound = 6 * length * gam * std.pow(2 / 3)
                    rows.append(pd.DataFrame({
                        "output_len": length, "pretrain_step": step, "temperature": tau,
                        "input": x.numpy(), "target_kind": [("worst", "random", "best")[k] for k in kind],
                        "reward_mean": mean.numpy(), "reward_std": std.numpy(),
                        "reward_max": rewards.max(1).values.numpy(), "grad_norm": grad.numpy(),
                        "gamma": gam.numpy(), "bound": bound.numpy(),
                        "bound_ratio": (grad / bound).numpy(),
                        "single_token_bound": (gam * std).numpy(),
                    }))
                bar.advance()
            table = pd.concat(rows, ignore_index=True)
            tables.append(table)
            run.log(output_len=length, n_points=len(table), max_bound_ratio=table.bound_ratio.max(),
                    max_single_token_ratio=(table.grad_norm / table.single_token_bound).max(),
                    frac_small_std=(table.reward_std < 0.01).mean())
            run.save_checkpoint({"lengths_done": index + 1, "tables": [_table_to_state(t) for t in tables]})
    inputs = pd.concat(tables, ignore_index=True)
    run.write_table("inputs", inputs)
    run.info(f"max ‖∇V‖/bound over {len(inputs)} points: {inputs.bound_ratio.max():.3g} (theorem: ≤ 1)")


def _table_to_state(table) -> dict:
    """A DataFrame as checkpointable columns: numeric ones as tensors (dtype kept), text as lists."""
    import pandas as pd
    import torch

    return {col: torch.tensor(table[col].to_numpy()) if pd.api.types.is_numeric_dtype(table[col])
            else table[col].tolist() for col in table.columns}


def _table_from_state(columns: dict):
    import pandas as pd
    import torch

    return pd.DataFrame({col: v.numpy() if isinstance(v, torch.Tensor) else v for col, v in columns.items()})


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Left: ‖∇V‖ vs STD coloured by expected reward. Right: ‖∇V‖/γ vs STD under the bounds 6L·STD^(2/3)."""
    import numpy as np
    import pandas as pd

    from rftlab import plotting
    from rftlab.results import read_table

    table = pd.concat([read_table(r, "inputs") for r in runs], ignore_index=True)
    table = table[table.reward_std > 0]
    fig, axes = plotting.figure(ncols=2, width=4.4)
    left, right = axes[0]
    points = left.scatter(table.reward_std, table.grad_norm, c=table.reward_mean, cmap="coolwarm_r",
                          vmin=-1, vmax=1, s=9, alpha=0.8, linewidths=0)
    fig.colorbar(points, ax=left, label="expected reward V(x)")
    left.set(xscale="log", yscale="log", xlabel="reward std under the policy", ylabel="‖∇θ V(x)‖ (exact)",
             title="Exact gradient norm vs reward std")
    s = np.logspace(np.log10(table.reward_std.min()), 0, 100)
    for length, group in table.groupby("output_len"):
        right.scatter(group.reward_std, group.grad_norm / group.gamma, s=8, alpha=0.7, label=f"L = {length}")
    for length in sorted(table.output_len.unique()):
        right.plot(s, 6 * length * s ** (2 / 3), color=plotting.COLORS["bound"], lw=0.8,
                   ls=(0, (1 + length, 2)))
    right.plot(s, s, color="black", lw=1.2, label="STD (L = 1 bound)")
    right.plot([], [], color=plotting.COLORS["bound"], lw=0.8, ls=":", label="6·L·STD^(2/3) (Thm 1)")
    right.set(xscale="log", yscale="log", xlabel="reward std under the policy", ylabel="‖∇θ V(x)‖ / γ(x)",
              title="Normalised gradient under Theorem 1's bound")
    right.legend(loc="lower right")
    return [plotting.save(fig, out_dir, "theorem_bound", fmt)]
