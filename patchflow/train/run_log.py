"""What a run records besides checkpoints: log.jsonl's records (one per log window: loss, throughput, MFU, the loss
by timestep `loss_by_t`, skipped steps), the progress bar and, when the `tensorboard` package is installed, the same
figures as TensorBoard scalars and sample images in RUN/tensorboard."""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from patchflow.flops import mfu_of_macs
from patchflow.report import TIMESTEP_BINS  # loss_by_t's bins of t / t_max (0 = data, 1 = pure noise): one format
from patchflow.train import distributed
from patchflow.train.rundir import stop_on_os_error


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


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN/Inf


class Meter:
    """One log window's figures on this process: items and their forward MACs, per-sample losses by timestep
    (`loss_bins`), steps and finite losses; `record` closes the window into a log.jsonl record (figures of all
    processes). Made with the trainer, so a train_step counts into it without fit."""

    def __init__(self, cfg, forward_macs: int, peak_flops: float, dist, device: torch.device, timed: bool):
        self.cfg, self.forward_macs, self.peak_flops, self.timed = cfg, forward_macs, peak_flops, timed
        self.dist, self.device = dist, device
        self.video = cfg.kind.video  # items of several shapes: images and clips of any length
        self._macs = {}  # forward MACs per item shape
        self.loss_bins = TimestepBins()  # this process's samples; summed over processes when logged
        self.steps, self.losses, self.alignments = 0, [], []
        self.restart()

    def restart(self) -> None:
        """Start the throughput clock again (at fit's start, and after sampling: not training throughput)."""
        self.start, self.items, self.macs = time.perf_counter(), 0, 0

    def macs_of(self, shape: tuple) -> int:
        """Forward MACs of one item of this (C, T, H, W) model-input shape: the run's figure at the training size;
        other sizes (a video run's images and shorter clips) scaled by their tokens, prompt tokens included (the
        attention's quadratic share is small at these lengths). No forward pass: under FSDP every process would
        have to run it together."""
        if shape not in self._macs:
            m = self.cfg.model
            if not self.video or len(shape) != 4:
                self._macs[shape] = self.forward_macs
            else:
                from patchflow.models import TEXT_TOKENS

                tokens = lambda t, h, w: t // m.temporal_patch * (h // m.patch_size) * (w // m.patch_size)  # noqa
                ratio = (tokens(*shape[1:]) + TEXT_TOKENS) / (tokens(m.frames, m.input_size, m.input_size)
                                                              + TEXT_TOKENS)
                self._macs[shape] = round(self.forward_macs * ratio)
        return self._macs[shape]

    def count(self, x0) -> None:
        """A micro-batch of model inputs: a tensor (B, C, T, H, W) or a pack (a list of (C, T, H, W))."""
        self.items += len(x0)
        self.macs += sum(self.macs_of(tuple(x.shape)) for x in x0) if isinstance(x0, list) else \
            len(x0) * self.macs_of(tuple(x0.shape[1:]))

    def aligned(self, value: float) -> None:
        """REPA's alignment term of a step (its part of `loss`), averaged into the record's "repa"."""
        self.alignments.append(value)

    def step(self, loss: float, finite: bool) -> None:
        self.steps += 1
        if finite:
            self.losses.append(loss)

    def record(self, step: int, loss: float, grad_norm: float, lr: float, bad_steps: int, finite: bool) -> dict:
        """The window's log.jsonl record (every process calls it at the same step: loss_by_t is summed over them);
        starts the next window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        world = self.dist.world
        record = {"step": step, "loss": _finite_or_none(loss),
                  "loss_avg": sum(self.losses) / len(self.losses) if self.losses else None,
                  "grad_norm": _finite_or_none(grad_norm), "lr": lr,
                  "images_per_s": self.items * world / elapsed,  # items (images or clips) per second
                  "steps_per_s": self.steps / elapsed,
                  "mfu": mfu_of_macs(self.macs * world / elapsed, self.peak_flops * world), "bad_steps": bad_steps}
        if self.timed:  # codec runs have no timestep
            record["loss_by_t"] = self.loss_bins.pop(lambda x: distributed.total(x, self.dist, self.device))
        if self.alignments:  # REPA: the mean alignment term of the window (-1 at perfect alignment)
            record["repa"] = sum(self.alignments) / len(self.alignments)
        if not finite:
            record["skipped"] = True
        self.steps, self.losses, self.alignments = 0, [], []
        self.restart()
        return record


class RunLog:
    """Where records go while fit runs: log.jsonl (the main process; a failed write stops the run with a
    TrainingError), TensorBoard and the progress bar. `first`: fields added to the first record written (what
    train.precision = "auto" chose)."""

    def __init__(self, out: Path, main: bool, progress: bool, steps: int, step: int, tensorboard: bool,
                 first: dict | None = None):
        self.out, self.path, self.first = out, out / "log.jsonl", dict(first or {})
        self.file = self.bar = None
        if main:
            with stop_on_os_error(str(self.path), step, out):
                self.file = open(self.path, "a")
        if progress and main:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
        self.board = open_tensorboard(out, tensorboard and main, step)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, record: dict) -> None:
        record, self.first = {**record, **self.first}, {}
        if self.file is not None:
            with stop_on_os_error(str(self.path), record["step"], self.out):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        if self.board is not None:
            tensorboard_record(self.board, record)
        if self.bar is not None and record["loss_avg"] is not None:
            self.bar.set_postfix(loss=f"{record['loss_avg']:.4f}", img_s=f"{record['images_per_s']:.0f}",
                                 mfu=f"{100 * record['mfu']:.0f}%")

    def samples(self, path: Path | None, step: int) -> None:
        tensorboard_samples(self.board, path, step)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        try:
            if self.board is not None:
                self.board.close()
            if self.file is not None:
                self.file.close()
        except OSError:
            pass  # a full disk fails the flush again; the error that stopped the run is already on its way
        self.close_bar()
