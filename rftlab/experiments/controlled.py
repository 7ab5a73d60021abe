"""Controlled bandit experiments of Razin et al. (ICLR 2024), §4.2, Fig. 3 and the appendix variants.

Each input is a one-step bandit over K labels. A classifier is pretrained with a soft cross-entropy
that spreads its mass over 5 labels per class ({c} ∪ 4 random others); then 10% of the train labels
are flipped to a class outside that set. The pretrained model gives the new label almost no
probability, so the flipped inputs start with reward std ≈ 0 and expected reward ≈ −1 (rewards are
+1 correct / −1 wrong). Finetuning then compares
  - RFT with the exact expected gradient of mean_x Σ_k p(k|x)·r(x,k) (no sampling: perfect exploration),
  - SFT, the cross-entropy on the new labels.
The claim: RFT leaves the small-std (flipped) inputs unfit while SFT fits them; both fit the rest,
and the small-std inputs' gradient under RFT is orders of magnitude smaller.

Presets: ``default`` (MLP on scikit-learn's 8×8 digits, Adam), ``sgd``, ``high-reward`` (wrong answers
on flipped inputs earn +0.5, so they start at small std *and* high reward), ``cnn`` (small CNN on digits,
the CPU stand-in for ResNet18/CIFAR-10), ``transformer`` (tiny Transformer on a 6-class token task, the
stand-in for BERT-mini/STS-B), ``paper`` / ``paper-cifar10`` / ``paper-stsb`` (real data from a local folder).

CPU runtime of the default preset: about 1 min (2 cores, 1 thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rftlab.registry import experiment

GROUPS = ("small_std", "rest")  # flipped (small initial reward std) inputs and all the others

METRICS = {
    "method": "rft (exact expected-gradient RFT) or sft (cross-entropy on the new labels)",
    "epoch, step": "finetuning epochs and optimizer steps done when the row was measured",
    "accuracy/{g}": "train accuracy of group g ∈ {small_std, rest} (argmax label = its possibly flipped label)",
    "reward/{g}": "exact expected train reward V(x) averaged over group g",
    "reward_std/{g}": "exact reward std under the policy, averaged over group g",
    "grad_norm/{g}": "‖∇θ‖ of the finetuning objective restricted to group g (mean over its inputs)",
    "test_accuracy": "accuracy on the untouched test labels",
    "inputs.parquet": "per (method, input): flipped, label, initial/final reward and reward std",
}


@dataclass(frozen=True)
class DataConfig:
    name: Literal["digits", "synthetic-sequences", "mnist", "cifar10", "stsb"] = "digits"  # data set
    data_dir: str = "data"  # folder holding the real data sets (paper presets only)
    n_train: int = 1000  # train inputs (stratified subsample; 0 = all)
    n_test: int = 0  # test inputs (stratified subsample; 0 = all that remain)
    labels_per_class: int = 5  # |S(c)|: pretraining spreads mass over c and 4 random other labels
    flip_fraction: float = 0.1  # fraction of train inputs relabelled outside S(c) (the small-std group)
    split_seed: int = 192  # seeds subsampling, label sets and flips (the paper's samples_rnd_seed)


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["mlp", "cnn", "resnet18", "transformer"] = "mlp"  # classifier architecture
    hidden: tuple[int, ...] = (250, 100)  # MLP hidden widths (paper: 784-250-100-10)
    width: int = 64  # CNN channels / Transformer width
    layers: int = 2  # Transformer layers
    heads: int = 4  # Transformer attention heads


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 500  # soft cross-entropy epochs (paper: 1000)
    lr: float = 1e-3  # Adam learning rate (paper: 1e-4; 1e-3 gives the flipped group std ≈ 0.01)
    batch_size: int = 512  # minibatch size


@dataclass(frozen=True)
class FinetuneConfig:
    methods: tuple[str, ...] = ("rft", "sft")  # finetuning methods, each from the same pretrained model
    optimizer: Literal["adam", "sgd"] = "adam"  # paper: Adam (main text), SGD (appendix)
    lr: float = 1e-4  # learning rate (paper: Adam 1e-4; SGD 1e-2, 1e-3 for BERT)
    epochs: int = 5000  # finetuning epochs (paper: 5000)
    batch_size: int = 512  # minibatch size (paper: 512)
    wrong_reward_flipped: float = -1.0  # reward of a wrong label on flipped inputs (high-reward variant: 0.5)
    eval_every: int = 50  # epochs between measurements
    checkpoint_every: int = 250  # epochs between checkpoints (for --resume)


@experiment(name="controlled", paper="Razin et al. 2024", figure="§4.2 Fig. 3 + appendix", version=1,
            cpu_runtime="~1 min")
@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0  # seeds model initialisation and minibatch order
    threads: int = 1  # torch intra-op threads (tiny models often run fastest on 1)

    def __post_init__(self) -> None:
        if not set(self.finetune.methods) <= {"rft", "sft"} or not self.finetune.methods:
            raise ValueError(f"finetune.methods must be a subset of rft, sft; got {self.finetune.methods}")
        if not 0 < self.data.flip_fraction < 1:
            raise ValueError("data.flip_fraction must be in (0, 1)")


def build_model(cfg: Config, data):
    from rftlab import bandit

    shape = data.x_train.shape
    if cfg.model.kind == "transformer":
        if not data.is_tokens:
            raise ValueError("model.kind=transformer needs a token data set (synthetic-sequences, stsb)")
        return bandit.TransformerClassifier(data.vocab_size, data.n_classes, shape[1], cfg.model.width,
                                            cfg.model.layers, cfg.model.heads)
    if data.is_tokens:
        raise ValueError(f"model.kind={cfg.model.kind} needs an image data set; use model.kind=transformer")
    if cfg.model.kind == "mlp":
        return bandit.MLP(shape[1:].numel(), data.n_classes, cfg.model.hidden)
    if cfg.model.kind == "cnn":
        return bandit.SmallCNN(shape[1], data.n_classes, cfg.model.width)
    return bandit.ResNet18(shape[1], data.n_classes)


def run(cfg: Config, run) -> None:
    import os

    import pandas as pd
    import torch

    from rftlab import bandit, runtime
    from rftlab.config import config_hash
    from rftlab.data import classification
    from rftlab.errors import RftlabError

    runtime.set_threads(cfg.threads)
    device = run.device
    data = classification.load(cfg.data.name, data_dir=cfg.data.data_dir, n_train=cfg.data.n_train,
                               n_test=cfg.data.n_test, seed=cfg.data.split_seed)
    split_gen = torch.Generator().manual_seed(cfg.data.split_seed)
    sets = bandit.label_sets(data.n_classes, cfg.data.labels_per_class, split_gen)
    labels, flipped = bandit.flip_labels(data.y_train, sets, cfg.data.flip_fraction, split_gen)
    rewards = bandit.reward_matrix(labels, flipped, data.n_classes, cfg.finetune.wrong_reward_flipped)
    x, x_test = data.x_train.to(device), data.x_test.to(device)
    labels, rewards, y_test = labels.to(device), rewards.to(device), data.y_test.to(device)
    groups = {"small_std": flipped.to(device), "rest": ~flipped.to(device)}
    n = x.shape[0]

    try:
        model = build_model(cfg, data).to(device)
    except ValueError as exc:
        raise RftlabError(str(exc)) from None

    # Stage 1: soft-label pretraining, cached by content hash so presets and seeds share it.
    key = config_hash((cfg.data, cfg.model, cfg.pretrain, cfg.seed))
    cache = run.cache_dir / f"controlled-pretrain-{key}.pt"
    if cache.exists():
        pretrained = torch.load(cache, map_location=device, weights_only=True)
        run.info(f"pretrained model from cache {cache}")
    else:
        runtime.seed_everything(cfg.seed)
        model = build_model(cfg, data).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        target_sets = sets.to(device)[data.y_train.to(device)]
        with run.progress(cfg.pretrain.epochs, "pretrain (soft labels)") as bar:
            for _ in range(cfg.pretrain.epochs):
                model.train()
                for idx in torch.randperm(n, generator=gen).split(cfg.pretrain.batch_size):
                    loss = bandit.soft_cross_entropy(model(x[idx]), target_sets[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                bar.advance()
        pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pretrained, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)

    def measure(method: str) -> dict[str, float]:
        """Per-group accuracy, exact reward and std, and the group objective's gradient norm."""
        model.eval()
        logits = torch.cat([model(chunk) for chunk in x.split(2048)])
        row = {}
        for g, mask in groups.items():
            row[f"accuracy/{g}"] = (logits[mask].argmax(-1) == labels[mask]).float().mean().item()
            row[f"reward/{g}"] = bandit.expected_reward(logits[mask], rewards[mask]).mean().item()
            row[f"reward_std/{g}"] = bandit.reward_std(logits[mask], rewards[mask]).mean().item()
            loss = bandit.finetune_loss(method, logits[mask], labels[mask], rewards[mask])
            grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
            row[f"grad_norm/{g}"] = torch.sqrt(sum(gr.pow(2).sum() for gr in grads)).item()
        with torch.no_grad():
            test_logits = torch.cat([model(chunk) for chunk in x_test.split(2048)])
        row["test_accuracy"] = (test_logits.argmax(-1) == y_test).float().mean().item()
        return row

    def per_input(method: str, stage: str) -> dict:
        """Per-input snapshot as plain tensors (checkpoints hold only weights-only-loadable types)."""
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in x.split(2048)])
        return {"method": method, "stage": stage,
                "reward": bandit.expected_reward(logits, rewards).cpu(),
                "reward_std": bandit.reward_std(logits, rewards).cpu(),
                "correct": (logits.argmax(-1) == labels).cpu()}

    # Stage 2: finetune each method from the same pretrained weights.
    ft = cfg.finetune
    steps_per_epoch = -(-n // ft.batch_size)
    state = run.load_checkpoint()
    first_method = state["method_index"] if state else 0
    tables = state["tables"] if state else []
    with run.progress(len(ft.methods) * ft.epochs, "finetune") as bar:
        bar.advance(first_method * ft.epochs + (state["epoch"] if state else 0))
        for m_index in range(first_method, len(ft.methods)):
            method = ft.methods[m_index]
            runtime.seed_everything(cfg.seed + 1 + m_index)
            model.load_state_dict(pretrained)
            optimizer = (torch.optim.Adam(model.parameters(), lr=ft.lr) if ft.optimizer == "adam"
                         else torch.optim.SGD(model.parameters(), lr=ft.lr))
            gen = torch.Generator().manual_seed(cfg.seed + 1 + m_index)
            start = 0
            if state and m_index == first_method:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                gen.set_state(state["generator"])
                start = state["epoch"]
            else:
                tables.append(per_input(method, "initial"))
            for epoch in range(start, ft.epochs + 1):
                if epoch % ft.checkpoint_every == 0 and epoch > start:
                    run.save_checkpoint({"method_index": m_index, "epoch": epoch, "model": model.state_dict(),
                                         "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                                         "tables": tables})
                if epoch % ft.eval_every == 0 or epoch == ft.epochs:
                    run.log(method=method, seed=cfg.seed, epoch=epoch, step=epoch * steps_per_epoch,
                            **measure(method))
                if epoch == ft.epochs:
                    break
                model.train()
                for idx in torch.randperm(n, generator=gen).split(ft.batch_size):
                    loss = bandit.finetune_loss(method, model(x[idx]), labels[idx], rewards[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                bar.advance()
            tables.append(per_input(method, "final"))
            final = measure(method)
            run.info(f"{method}: train accuracy small_std {final['accuracy/small_std']:.3f}, "
                     f"rest {final['accuracy/rest']:.3f}; test {final['test_accuracy']:.3f}")
    inputs = pd.concat([
        pd.DataFrame({"method": method, "input": range(n), "flipped": flipped.numpy(),
                      "label": labels.cpu().numpy(), "original_label": data.y_train.numpy(),
                      **{f"{snap['stage']}_{k}": snap[k].numpy() for snap in tables if snap["method"] == method
                         for k in ("reward", "reward_std", "correct")}})
        for method in ft.methods
    ], ignore_index=True)
    run.write_table("inputs", inputs)


def plot(runs: list[Path], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Fig. 3 layout: train accuracy of the small-std and other inputs, their reward std and gradient
    norms over finetuning epochs, RFT vs SFT (mean ± std over seeds when several runs are given)."""
    import pandas as pd

    from rftlab import plotting
    from rftlab.results import read_json, read_metrics

    frame = pd.concat([read_metrics(r) for r in runs], ignore_index=True)
    title = read_json(runs[0] / "config.json")["config"]
    data_name, model_kind = title["data"]["name"], title["model"]["kind"]
    fig, axes = plotting.figure(ncols=4, width=3.3, height=3.0)
    panels = [("accuracy/small_std", "train accuracy", "small-std inputs (flipped labels)", False),
              ("accuracy/rest", "train accuracy", "other inputs", False),
              ("reward_std", "reward std (mean over group)", "reward std", True),
              ("grad_norm", "‖∇θ objective of group‖", "gradient norm", True)]
    for ax, (column, ylabel, name, by_group) in zip(axes[0], panels, strict=True):
        for method, part in frame.groupby("method", sort=False):
            color = plotting.COLORS[method]
            for group in GROUPS if by_group else (None,):
                col = f"{column}/{group}" if group else column
                stats = plotting.mean_std(part, ["epoch"], col)
                style = "-" if group in (None, "small_std") else "--"
                label = method.upper() + (f", {group.replace('_', '-')}" if group else "")
                plotting.band(ax, stats.epoch, stats["mean"], stats["std"], color=color, ls=style, label=label)
        ax.set(title=name, xlabel="finetuning epoch", ylabel=ylabel)
        if by_group:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.legend(loc="best")
    fig.suptitle(f"RFT vs SFT on a {model_kind.upper()} ({data_name}); {len(runs)} seed(s)")
    return [plotting.save(fig, out_dir, "controlled", fmt)]
