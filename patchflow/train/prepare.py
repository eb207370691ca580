"""What a run needs before its Trainer is built, checked and resolved in an order that stops a bad run before any
work: the run directory (what --resume may continue, a writable --out), the processes and the device, a text run's
encoder, the class folders, the precision (train.precision = "auto" chosen once by the main process, kept on
--resume), the run's codec and a video codec run's image codec.

A codec the run needs comes from `get_codec(spec)`: codecs.load by default, which never trains; the entry point
(patchflow.train.run.train) hands in ensure_codec, which trains a shipped codec preset that is not cached yet, so
a preset is trained before the run's Trainer exists and the Trainer never starts another training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from patchflow import codecs
from patchflow.config import ConfigError, RunConfig
from patchflow.flops import choose_precision
from patchflow.pipeline import resolve_device
from patchflow.train import distributed, rundir
from patchflow.train.codec import codec_for_run, inflation
from patchflow.train.inputs import check_classes


@dataclass
class Setup:
    """What prepare resolved, handed to the Trainer."""
    dist: distributed.Dist
    device: torch.device
    precision: str                          # what the run computes in: "fp32", "bf16" or "fp16"
    chosen: tuple[str, dict] | None = None  # (precision, matmul FLOP/s by dtype) when train.precision = "auto"
    classes: list[str] = field(default_factory=list)  # a class run's folder names (label = position)
    text_encoder: object = None             # a text run's frozen encoder, on the device
    codec: codecs.Codec | None = None       # the run's codec (codec.source) on the CPU; None when it trains on pixels
    vision: object = None                   # REPA's frozen vision encoder (repa.encoder), on the CPU
    inflate: Callable | None = None         # starts a video codec run's autoencoder from its image codec


def prepare(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
            get_codec: Callable = codecs.load) -> Setup:
    out, t = Path(out_dir), cfg.train
    rundir.check_resume(cfg, out, resume)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    dist, device = distributed.init(resolve_device(t.device))
    if t.batch_size % dist.world:
        raise ConfigError(f"train.batch_size = {t.batch_size} is the global batch and must be divisible by the "
                          f"{dist.world} processes")
    distributed.barrier(dist)  # every process has checked the run directory before the main one writes
    if dist.main:
        rundir.prepare_out_dir(out)
    setup = Setup(dist, device, *_precision(cfg, out, resume, dist, device))
    if cfg.kind.prompts:  # a missing or mismatched text encoder fails here, before a codec is trained
        from patchflow.conditioning import load_run_text_encoder

        setup.text_encoder = load_run_text_encoder(cfg, device)
    setup.classes = check_classes(cfg)  # before a codec is trained on data whose labels the model cannot take
    if cfg.repa.enabled:  # the main process trains a missing world encoder; the others then read it
        from patchflow.vision import load_vision_encoder

        steps = cfg.repa.world_steps
        if dist.main:
            setup.vision = load_vision_encoder(cfg.repa.encoder, cfg.data, progress=progress, world_steps=steps)
        distributed.barrier(dist)
        if not dist.main:
            setup.vision = load_vision_encoder(cfg.repa.encoder, cfg.data, progress=False, train_missing=False,
                                               world_steps=steps)
    if cfg.codec.source != "identity":  # the main process writes the run's copy of its codec; the others read it
        if dist.main:
            setup.codec = codec_for_run(cfg, out, resume, get_codec, main=True)
        distributed.barrier(dist)
        if not dist.main:
            setup.codec = codec_for_run(cfg, out, resume, get_codec, main=False)
    setup.inflate = inflation(cfg, get_codec)
    return setup


def _precision(cfg: RunConfig, out: Path, resume: bool, dist, device: torch.device) -> tuple[str, tuple | None]:
    """(the precision the run computes in, (choice, rates) when train.precision = "auto" chose it). "auto" on
    --resume keeps what the run's config.toml records; every process takes the main process's choice."""
    setting, chosen = cfg.train.precision, None
    if setting == "auto":
        if dist.main:
            chosen = (rundir.saved_precision(out) if resume else None) or choose_precision(device)
        chosen = distributed.from_main(chosen, dist)
        setting = chosen[0]
    if device.type == "cuda":  # TF32 matmuls: fp32 training at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif setting == "fp16":
        raise ConfigError("train.precision = \"fp16\" needs a CUDA device (its grad scaler is for GPUs); "
                          "use \"bf16\" on CPUs")
    return setting, chosen
