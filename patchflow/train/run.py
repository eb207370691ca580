"""The entry point of training: `train(cfg, out_dir)` for the CLI, the demo and Python callers, on one process or
as one of torchrun's processes (WORLD_SIZE > 1: DDP or FSDP2).

It resolves what the run needs first (patchflow.train.prepare: the run directory, the device, the precision, the
codec), training a shipped codec preset the run uses when it is not cached yet (`ensure_codec`, which calls train
for it), then builds the Trainer with that, fits it, and exports a codec run's codec.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from patchflow import codecs
from patchflow.codecs import Codec, CodecError
from patchflow.config import RunConfig, load_config
from patchflow.train import distributed
from patchflow.train.codec import export_codec
from patchflow.train.prepare import prepare
from patchflow.train.trainer import Trainer


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train on this process, or as one of torchrun's processes (WORLD_SIZE > 1): DDP or FSDP2."""
    try:
        out = build_trainer(cfg, out_dir, resume=resume, progress=progress).fit()
    finally:
        distributed.shutdown()
    if cfg.kind.codec and int(os.environ.get("RANK", "0")) == 0:  # the codec, with its latent statistics
        export_codec(out, cfg)
    return out


def build_trainer(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> Trainer:
    """The run's Trainer, built once what it needs is resolved: codec presets it uses are trained first."""
    setup = prepare(cfg, out_dir, resume, progress, get_codec=functools.partial(ensure_codec, progress=progress))
    return Trainer(cfg, out_dir, resume=resume, progress=progress, setup=setup)


def ensure_codec(spec: str, progress: bool = True) -> Codec:
    """codecs.load(spec), first training a shipped codec preset into the cache when it is not there yet (a run
    killed half way is resumed)."""
    from patchflow.codecs.presets import cached_codec_dir, is_codec_preset

    if is_codec_preset(spec):
        d = cached_codec_dir(spec)
        if not (d / "codec" / "codec.json").is_file():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise CodecError(f"codec preset {spec!r} is not trained on this machine yet; train it once before "
                                 f"starting several processes: `patchflow train {spec}`")
            if progress:
                print(f"codec {spec!r} is not in the cache yet: training it first into {d}", flush=True)
            train(load_config(spec), d, resume=(d / "config.toml").is_file(), progress=progress)
    return codecs.load(spec)
