"""Shipped codec presets (`codec-digits`, ...) and where their trained codecs are cached on this machine."""
from __future__ import annotations

import hashlib
from pathlib import Path

from patchflow.paths import cache_root


def codec_preset_names() -> list[str]:
    from patchflow.config import PRESET_DIR

    return sorted(p.stem for p in PRESET_DIR.glob("codec-*.toml"))


def is_codec_preset(name: str) -> bool:
    return name in codec_preset_names()


def cached_codec_dir(name: str) -> Path:
    """The run directory that trains preset `name` in the cache: `<cache>/codecs/<name>-<hash of the preset>`, so an
    edited preset trains a new codec instead of reusing one made by another recipe."""
    from patchflow.config import load_config

    digest = hashlib.sha256(load_config(name).to_toml().encode()).hexdigest()[:12]
    return cache_root() / "codecs" / f"{name}-{digest}"
