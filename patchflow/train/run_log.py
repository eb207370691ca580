"""What a run records besides checkpoints: the loss by timestep (`loss_by_t` in log.jsonl) and, when the
`tensorboard` package is installed, the same figures as TensorBoard scalars and sample images in RUN/tensorboard."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from patchflow.report import TIMESTEP_BINS  # loss_by_t's bins of t / t_max (0 = data, 1 = pure noise): one format


class TimestepBins:
    """Per-sample training losses summed by timestep bin over one log window."""

    def __init__(self, bins: int = TIMESTEP_BINS):
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.sum = torch.zeros(self.bins, dtype=torch.float64)
        self.count = torch.zeros(self.bins, dtype=torch.float64)

    def add(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """t: (B,) in [0, 1]; losses: (B,)."""
        index = (t.detach().double().cpu().clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)
        self.sum.index_add_(0, index, losses.detach().double().cpu())
        self.count.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def pop(self, reduce=None) -> list[float | None]:
        """The window's mean loss per bin (None for a bin no sample fell in); starts a new window. `reduce` sums
        the (2, bins) sums and counts over processes (every process calls pop at the same step)."""
        both = torch.stack([self.sum, self.count])
        if reduce is not None:
            both = reduce(both)
        means = [float(s / n) if n else None for s, n in zip(both[0].tolist(), both[1].tolist())]
        self.reset()
        return means


def model_times(inputs: tuple, t_max: float | None) -> torch.Tensor | None:
    """The normalised timestep of each sample from the model's inputs (x, t, ...): t (B,) or per frame (B, T),
    where a clip's given frames sit at 0 and its noisy ones share the clip's timestep. None for objectives
    without one (codecs)."""
    if t_max is None or len(inputs) < 2 or not torch.is_tensor(inputs[1]):
        return None
    t = inputs[1].detach().float()
    return (t.amax(dim=1) if t.ndim == 2 else t) / t_max


def open_tensorboard(out: Path, enabled: bool, step: int):
    """A SummaryWriter on RUN/tensorboard, or None when disabled or the package is missing. A run resumed at
    `step` purges the events written after that checkpoint, so the curves hold no duplicated steps."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: `pip install tensorboard` turns it on
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)


def tensorboard_record(writer, record: dict) -> None:
    """One log.jsonl record as scalars (loss_by_t as loss_by_t/<bin range>)."""
    step = record["step"]
    for key, value in record.items():
        if key in ("step", "skipped") or value is None:
            continue
        if key == "loss_by_t":
            n = len(value)
            for i, v in enumerate(value):
                if v is not None:
                    writer.add_scalar(f"loss_by_t/{i / n:.1f}-{(i + 1) / n:.1f}", v, step)
        elif isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}", value, step)
    writer.flush()


def tensorboard_samples(writer, path: Path | None, step: int) -> None:
    """A sample grid file (PNG, or an animated GIF's frames side by side) as the image `samples`."""
    if writer is None or path is None:
        return
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    except OSError as e:  # the grid was written a moment ago; a failed read only loses the TensorBoard copy
        warnings.warn(f"tensorboard: could not read {path}: {e}")
        return
    writer.add_image("samples", np.concatenate(frames[:8], axis=1), step, dataformats="HWC")
    writer.flush()
