"""Where patchflow keeps what it computes once per machine (digit classifier, trained codec presets, latents)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$PATCHFLOW_CACHE, else ~/.cache/patchflow."""
    return Path(os.environ.get("PATCHFLOW_CACHE") or Path.home() / ".cache" / "patchflow").expanduser()
