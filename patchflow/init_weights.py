"""The weights a run starts from (train.init_from): a run directory's EMA weights (its latest checkpoint's when the
run is unfinished) or a .safetensors file, loaded strictly; an image MMDiT into a video model. A LoRA run's base is
loaded this way by the trainer and by sampling alike, and identified by the sha256 of the file read."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from patchflow.checks import ConfigError
from patchflow.run_dir import latest_checkpoint, load_into, load_weights
from patchflow.weights import hash_files


def weights_file(source: str) -> Path:
    """The file train.init_from = `source` names."""
    path = Path(source).expanduser()
    if path.is_dir():
        ckpt = path / "ema.safetensors"
        if not ckpt.is_file():
            latest = latest_checkpoint(path)
            if latest is None:
                raise FileNotFoundError(f"train.init_from = {source!r}: no ema.safetensors and no checkpoint in it")
            ckpt = latest / "ema.safetensors"
        path = ckpt
    return path


def load_start(video: bool, net: nn.Module, source: str) -> Path:
    """`source`'s weights into `net` (video: a video run's, or an image MMDiT's with the temporal blocks left at
    their init). Returns the file read."""
    path = weights_file(source)
    weights = load_weights(path)
    try:
        if video:
            from patchflow.models.video import load_image_weights

            load_image_weights(net, weights)
        else:
            load_into(net, weights, source=str(path))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"train.init_from = {source!r}: {e}") from None
    return path


def check_base(recorded: str, path: Path, what: str, role: str = "base weights",
               since: str = "the adapter was trained on them",
               fix: str = "restore that base or train the adapter again") -> str:
    """The sha256 of weights a run stands on (a LoRA run's base, a student's teacher); refused when it changed since
    the run recorded `recorded` ("" = nothing recorded yet)."""
    digest = hash_files([path])
    if recorded and recorded != digest:
        raise ConfigError(f"{what}: the {role} {path} changed since {since} (sha256 "
                          f"{digest[:12]}..., the run recorded {recorded[:12]}...); {fix}")
    return digest
