"""Shipped codec presets (`codec-digits`, ...) and where their trained codecs are cached on this machine."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from patchflow.paths import cache_root


def codec_preset_names() -> list[str]:
    from patchflow.config import PRESET_DIR

    return sorted(p.stem for p in PRESET_DIR.glob("codec-*.toml"))


def is_codec_preset(name: str) -> bool:
    return name in codec_preset_names()


# the training settings that decide a codec's weights (not logging, checkpointing, devices or later switches)
TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "betas", "warmup_steps", "grad_clip",
              "ema_decay", "ema_warmup", "seed", "precision")
SCHEDULE_KEYS = ("lr_schedule", "lr_decay_steps", "lr_final")  # in the hash when set, so older codecs keep theirs


def cached_codec_dir(name: str) -> Path:
    """The run directory that trains preset `name` in the cache: `<cache>/codecs/<name>-<hash>`, the hash of what
    makes the codec (its [model] and [train] sections and its data's identity, world version included), so an
    edited preset or a changed world trains a new codec, and a new config key elsewhere keeps the trained one."""
    from patchflow.config import load_config
    from patchflow.data.latent_cache import data_identity

    cfg = load_config(name)
    default = type(cfg.train)()
    train = {k: getattr(cfg.train, k) for k in TRAIN_KEYS}
    train |= {k: getattr(cfg.train, k) for k in SCHEDULE_KEYS if getattr(cfg.train, k) != getattr(default, k)}
    recipe = {"model": dataclasses.asdict(cfg.model), "train": train, "data": data_identity(cfg.data)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "codecs" / f"{name}-{digest}"
