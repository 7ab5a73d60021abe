"""One-step bandit environments built from classification data (Razin et al. 2024, §4.2).

Each input x is a one-step episode: the policy p_θ(·|x) = softmax(f_θ(x)) picks one of K labels and
gets reward r(x, k). Because K is small, the RFT objective is computed exactly (no sampling):

    V(θ) = mean_x Σ_k p_θ(k|x) · r(x, k)                                  ("expected_reinforce")

so exploration and estimator variance play no part, and the only obstacle left for an input is its
small reward standard deviation STD_k[r(x,k)] = sqrt(Σ_k p_k (r_k − V(x))²).

Recipe of the paper's controlled experiments:
1. pretrain with a soft cross-entropy −mean_{j∈S(c)} log p_j over a label set S(c) = {c} ∪ (4 random
   other labels, fixed per class) — the model spreads its mass over 5 labels per class;
2. give a fraction of the train inputs a new label outside S(c): the pretrained model assigns it
   almost no probability, so those inputs start with reward std ≈ 0 and V(x) ≈ −1;
3. finetune with RFT (ascend V) or SFT (cross-entropy on the new labels) and compare the groups.
"""

from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------- labels
def label_sets(n_classes: int, set_size: int, generator: torch.Generator) -> torch.Tensor:
    """S(c) for every class: row c is c followed by ``set_size - 1`` other distinct classes, (K, set_size)."""
    rows = []
    for c in range(n_classes):
        others = torch.tensor([k for k in range(n_classes) if k != c])
        pick = others[torch.randperm(len(others), generator=generator)[: set_size - 1]]
        rows.append(torch.cat([torch.tensor([c]), pick]))
    return torch.stack(rows)


def flip_labels(labels: torch.Tensor, sets: torch.Tensor, fraction: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``fraction`` of the inputs a label drawn uniformly from outside their class's set.

    Returns (new_labels (N,), flipped mask (N,) bool).
    """
    n, n_classes = labels.shape[0], sets.shape[0]
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    allowed = torch.ones(n, n_classes, dtype=torch.bool)
    allowed[torch.arange(n)[:, None], sets[labels]] = False  # labels outside S(y)
    draw = torch.multinomial(allowed.float(), 1, generator=generator).squeeze(1)
    return torch.where(flipped, draw, labels), flipped


def reward_matrix(labels: torch.Tensor, flipped: torch.Tensor, n_classes: int,
                  wrong_reward_flipped: float = -1.0) -> torch.Tensor:
    """r(x, k) for all inputs and labels, (N, K): +1 for the label, −1 otherwise.

    ``wrong_reward_flipped`` replaces −1 for wrong labels on flipped inputs (+0.5 in the paper's
    "high initial reward" variant, which starts those inputs at small std *and* high reward).
    """
    correct = nn.functional.one_hot(labels, n_classes).bool()
    wrong = torch.where(flipped[:, None], wrong_reward_flipped, -1.0).expand(-1, n_classes)
    return torch.where(correct, torch.ones(()), wrong)


# ------------------------------------------------------------------------------------------ objectives
def soft_cross_entropy(logits: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """Pretraining loss −mean_{j∈S} log p_j per input, averaged; logits (B, K), sets (B, |S|)."""
    return -torch.log_softmax(logits, -1).gather(1, sets).mean()


def expected_reward(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Exact V(x) = Σ_k p(k|x) r(x,k) per input: (B, K), (B, K) → (B,)."""
    return (torch.softmax(logits, -1) * rewards).sum(-1)


def reward_std(logits: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Exact STD_k[r(x,k)] per input under p(·|x): (B, K), (B, K) → (B,)."""
    p = torch.softmax(logits, -1)
    mean = (p * rewards).sum(-1, keepdim=True)
    return (p * (rewards - mean) ** 2).sum(-1).clamp_min(0).sqrt()


def finetune_loss(method: str, logits: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The minimised objective: RFT = −mean V(x) (exact expected gradient), SFT = mean NLL of the labels."""
    if method == "rft":
        return -expected_reward(logits, rewards).mean()
    if method == "sft":
        return nn.functional.cross_entropy(logits, labels)
    raise ValueError(f"unknown method {method!r}")


# -------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """Fully connected ReLU network, in → 250 → 100 → K in the paper (MNIST: 784-250-100-10)."""

    def __init__(self, in_features: int, n_classes: int, hidden: tuple[int, ...] = (250, 100)) -> None:
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head for small images (the CPU stand-in for ResNet18)."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(8 * width, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016; torchvision's layout: 7×7 stem, max-pool, 4 stages of 2 basic blocks),
    randomly initialised with a K-way head, as the paper's CIFAR-10 model."""

    def __init__(self, in_channels: int, n_classes: int) -> None:
        super().__init__()
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerClassifier(nn.Module):
    """Token embedding + learned positions, a pre-LN Transformer encoder, mean pooling over non-pad
    tokens, linear head. Randomly initialised, dropout 0 (the paper's BERT-mini on STS-B is also
    trained from a random init; ``layers=4, width=256, heads=4`` matches BERT-mini's sizes)."""

    def __init__(self, vocab_size: int, n_classes: int, max_len: int, width: int = 64, layers: int = 2,
                 heads: int = 4, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) ids, ``pad_id`` for padding → logits (B, K)."""
        keep = tokens != self.pad_id
        h = self.encoder(self.embed(tokens) + self.position[: tokens.shape[1]], src_key_padding_mask=~keep)
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)
