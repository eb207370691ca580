"""Skipping bad files: one warning per file, a summary, and a `__getitem__` that never stops training.

Data sets built on `ScannedDataset` read every file once when they are built and keep only the good ones, so
their length, their labels and therefore every batch (a pure function of the batch index, see
`ResumableBatchSampler`) stay fixed for the whole run and across resumes. A file that goes bad after the scan
is replaced by the next readable item (index + 1, + 2, ... modulo the length): the substitute is a pure
function of the index too, and training continues.
"""
from __future__ import annotations

import warnings

import torch


class BadDataWarning(UserWarning):
    """A file (or caption line) that was skipped or replaced; the message names it."""


def describe(e: BaseException) -> str:
    """'OSError: image file is truncated': what went wrong, on one line, for a warning."""
    text = " ".join(str(e).split())  # one line: some decoders (imageio) write paragraphs
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class SkipLog:
    """Collects skipped items as (name, reason) and warns once per item, naming it."""

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append((str(name), reason))
        warnings.warn(f"skipping {name}: {reason}", BadDataWarning, stacklevel=3)

    def summary(self, total: int, noun: str) -> None:
        """One closing warning 'skipped N of M images (see warnings)' when anything was skipped."""
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} of {total} {noun} (see warnings)", BadDataWarning,
                          stacklevel=3)


class ScannedDataset(torch.utils.data.Dataset):
    """Base of the file data sets: `self.items` holds the good items found by the scan in the constructor.

    Subclasses set `items` as (path, target) pairs and `skipped`, and implement `load(i)` (the tensor); the
    target is a label or a caption. Items are (load(j), target(j)) where j is i or its substitute.
    """

    items: list[tuple]
    skipped: list[tuple[str, str]]

    def load(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def target(self, i: int):
        return self.items[i][1]

    def name(self, i: int) -> str:
        """The file, for messages."""
        return str(self.items[i][0])

    def __len__(self) -> int:
        return len(self.items)

    def stands_in(self, i: int, j: int) -> bool:
        """Whether item j may replace item i when i became unreadable (any item, unless a subclass says)."""
        return True

    def __getitem__(self, index):
        """Item `index`, or, when its file became unreadable after the scan, the next readable item that may
        stand in for it (warned once per file)."""
        n = len(self.items)
        i = int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a data set of {n} items")
        for k in range(n):
            j = (i + k) % n
            if not self.stands_in(i, j):
                continue
            try:
                x = self.load(j)
            except Exception as e:  # any decoder error of a file that read fine at the scan: keep training
                self._warn_late(j, e)
                continue
            return x, self.target(j)
        m = sum(self.stands_in(i, j) for j in range(n))
        raise RuntimeError(f"none of the {m} files of this data set that could replace {self.name(i)} can be read "
                           f"any more; they all decoded when the data set was built")

    def _warn_late(self, j: int, e: BaseException) -> None:
        # once per file and process: a file read every epoch would otherwise warn every epoch
        warned = self.__dict__.setdefault("_warned_late", set())
        if j not in warned:
            warned.add(j)
            warnings.warn(f"{self.name(j)} became unreadable after the scan ({describe(e)}); using the next "
                          f"readable item in its place", BadDataWarning, stacklevel=3)
