"""Data sets and the resumable batch order."""
from __future__ import annotations

import torch

from patchflow.config import DataConfig


def build_dataset(cfg: DataConfig, split: str = "train") -> torch.utils.data.Dataset:
    """Items are (x: (C, T, H, W) in [-1, 1], label)."""
    if cfg.dataset == "digits":
        from patchflow.data.digits import DigitsDataset

        return DigitsDataset(split=split, seed=cfg.seed)
    raise ValueError(f"unknown data.dataset {cfg.dataset!r}")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless batches of indices; epoch e is a permutation seeded by (seed, e), last partial batch dropped.

    Batch b is a pure function of (seed, b), so a run resumed at batch b sees exactly the data it would have.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, start: int = 0):
        if size < batch_size:
            raise ValueError(f"the data set has {size} items, fewer than one batch of {batch_size}; "
                             f"lower train.batch_size or add data")
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.per_epoch = size // batch_size

    def _perm(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch, not per batch
            self._epoch = epoch
            self._cached = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return self._cached

    def batch(self, b: int) -> list[int]:
        epoch, offset = divmod(b, self.per_epoch)
        return self._perm(epoch)[offset * self.batch_size:(offset + 1) * self.batch_size].tolist()

    def __iter__(self):
        b = self.start
        while True:
            yield self.batch(b)
            b += 1
