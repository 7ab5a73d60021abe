"""Classification data for the controlled bandit experiments (Razin et al. 2024, §4.2).

CPU defaults need no download: scikit-learn's shipped 8×8 digits stand in for MNIST (and CIFAR-10
with a small CNN), and a generated 6-class token-sequence task stands in for STS-B. At paper scale the
real MNIST, CIFAR-10 and GLUE STS-B are read from a local folder; when missing, the error names the
files to put there.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rftlab.errors import RftlabError


@dataclass
class ClassificationData:
    """Train/test tensors; x is (N, C, H, W) float for images or (N, T) long token ids (0 = pad)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    vocab_size: int = 0  # token tasks only

    @property
    def is_tokens(self) -> bool:
        return self.x_train.dtype == torch.long


def load(name: str, *, data_dir: str, n_train: int, n_test: int, seed: int) -> ClassificationData:
    """Load data set ``name`` with stratified subsamples of ``n_train`` / ``n_test`` inputs (0 = all)."""
    loaders = {"digits": _digits, "synthetic-sequences": _synthetic_sequences, "mnist": _mnist,
               "cifar10": _cifar10, "stsb": _stsb}
    if name not in loaders:
        raise RftlabError(f"unknown data set {name!r}: use one of {', '.join(loaders)}.")
    return loaders[name](Path(data_dir).expanduser(), n_train, n_test, seed)


def _stratified(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-stratified random subsample of size n (all rows if n is 0 or ≥ len)."""
    if n <= 0 or n >= len(y):
        return x, y
    from sklearn.model_selection import train_test_split

    x_sub, _, y_sub, _ = train_test_split(x, y, train_size=n, stratify=y, random_state=seed)
    return x_sub, y_sub


def _as_data(x_tr, y_tr, x_te, y_te, n_classes: int, vocab_size: int = 0) -> ClassificationData:
    dtype = torch.long if vocab_size else torch.float32
    return ClassificationData(torch.as_tensor(x_tr, dtype=dtype), torch.as_tensor(y_tr, dtype=torch.long),
                              torch.as_tensor(x_te, dtype=dtype), torch.as_tensor(y_te, dtype=torch.long),
                              n_classes, vocab_size)


def _digits(_: Path, n_train: int, n_test: int, seed: int) -> ClassificationData:
    """scikit-learn's 1,797 8×8 digit images (pixel values 0..16, scaled to [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0)[:, None].astype(np.float32)
    n_train = n_train or 1000
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, train_size=n_train, stratify=digits.target,
                                              random_state=seed)
    x_te, y_te = _stratified(x_te, y_te, n_test, seed)
    return _as_data(x_tr, y_tr, x_te, y_te, 10)


def synthetic_sequences(n: int, n_classes: int, length: int, vocab_size: int, seed: int) -> tuple:
    """A 6-class token task: the label is the class token (ids 1..K) that occurs most often.

    Each sequence draws its length uniformly in [length/2, length]; tokens are uniform over the
    vocabulary except that 30% of positions are forced to a drawn class's token; the label is the
    class token that occurs most often in the final sequence. Returns (tokens (n, length) with 0 = pad, labels (n,)).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(n_classes, size=n)
    tokens = rng.integers(1, vocab_size, size=(n, length))
    forced = rng.random((n, length)) < 0.3
    tokens = np.where(forced, labels[:, None] + 1, tokens)
    lengths = rng.integers(length // 2, length + 1, size=n)
    tokens[np.arange(length)[None] >= lengths[:, None]] = 0
    counts = np.stack([(tokens == k + 1).sum(1) for k in range(n_classes)], 1)
    return tokens, counts.argmax(1)  # noise or truncation can move the majority: label what the data says


def _synthetic_sequences(_: Path, n_train: int, n_test: int, seed: int) -> ClassificationData:
    n_train, n_test = n_train or 2000, n_test or 1000
    x, y = synthetic_sequences(n_train + n_test, 6, 24, 32, seed)
    return _as_data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 6, vocab_size=32)


def _missing(what: str, where: Path, how: str) -> RftlabError:
    return RftlabError(f"{what} not found at {where}: {how}, or set data.data_dir=<folder>.")


def _mnist(root: Path, n_train: int, n_test: int, seed: int) -> ClassificationData:
    """MNIST from ``<data_dir>/mnist.npz`` (arrays x_train, y_train, x_test, y_test, as Keras ships it)."""
    path = root / "mnist.npz"
    if not path.exists():
        raise _missing("MNIST", path, "download mnist.npz (Keras format) into that folder")
    with np.load(path) as f:
        x_tr, y_tr, x_te, y_te = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    x_tr, y_tr = _stratified((x_tr / 255.0)[:, None].astype(np.float32), y_tr, n_train, seed)
    x_te, y_te = _stratified((x_te / 255.0)[:, None].astype(np.float32), y_te, n_test, seed)
    return _as_data(x_tr, y_tr, x_te, y_te, 10)


def _cifar10(root: Path, n_train: int, n_test: int, seed: int) -> ClassificationData:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the official python pickle batches)."""
    folder = root / "cifar-10-batches-py"
    if not (folder / "test_batch").exists():
        raise _missing("CIFAR-10", folder, "extract cifar-10-python.tar.gz into the data folder")

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(batch[b"data"].reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"]))
        mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
        std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)[:, None, None]
        return ((np.concatenate(xs) / 255.0 - mean) / std).astype(np.float32), np.concatenate(ys)

    x_tr, y_tr = _stratified(*read([f"data_batch_{i}" for i in range(1, 6)]), n_train, seed)
    x_te, y_te = _stratified(*read(["test_batch"]), n_test, seed)
    return _as_data(x_tr, y_tr, x_te, y_te, 10)


def _stsb(root: Path, n_train: int, n_test: int, seed: int, max_len: int = 128) -> ClassificationData:
    """GLUE STS-B from ``<data_dir>/STS-B/{train,dev}.tsv``; label = round(score) ∈ {0..5}.

    Text becomes word ids from a vocabulary of the training split (``[CLS] s1 [SEP] s2``). The
    paper's randomly initialised BERT-mini uses a WordPiece vocabulary; since no weights are
    pretrained, the tokenizer only changes the input code, not the experiment.
    """
    folder = root / "STS-B"
    if not (folder / "train.tsv").exists():
        raise _missing("STS-B", folder, "download GLUE STS-B and extract train.tsv and dev.tsv there")
    import pandas as pd

    def read(name: str) -> tuple[list[list[str]], np.ndarray]:
        frame = pd.read_csv(folder / name, sep="\t", quoting=3, on_bad_lines="skip")
        words = [re.findall(r"\w+|[^\w\s]", f"{a} [SEP] {b}".lower())
                 for a, b in zip(frame.sentence1.astype(str), frame.sentence2.astype(str), strict=True)]
        return words, frame.score.round().astype(int).to_numpy()

    train_words, y_tr = read("train.tsv")
    test_words, y_te = read("dev.tsv")
    vocab = {w: i + 3 for i, w in enumerate(sorted({w for s in train_words for w in s}))}  # 0 pad, 1 cls, 2 unk

    def encode(sentences: list[list[str]]) -> np.ndarray:
        out = np.zeros((len(sentences), max_len), dtype=np.int64)
        for i, s in enumerate(sentences):
            ids = [1] + [vocab.get(w, 2) for w in s][: max_len - 1]
            out[i, : len(ids)] = ids
        return out

    x_tr, y_tr = _stratified(encode(train_words), y_tr, n_train, seed)
    x_te, y_te = _stratified(encode(test_words), y_te, n_test, seed)
    return _as_data(x_tr, y_tr, x_te, y_te, 6, vocab_size=len(vocab) + 3)
