"""What REPA asks of a frozen vision encoder, and the errors its loading raises."""
from __future__ import annotations

import torch
import torch.nn as nn


class VisionError(ValueError):
    """An encoder directory that is missing, incomplete or cannot take the data; the message says how to fix it."""


class VisionEncoder(nn.Module):
    """A frozen image encoder: `features(x)` maps images (N, C, H, W) in [-1, 1] to patch features (N, h, w, dim).

    `name` is for messages; `identity()` is a JSON-able dict that changes whenever the features would (weights,
    preprocessing), so a feature cache made with another encoder is refused."""

    name: str = "encoder"
    dim: int = 0

    def identity(self) -> dict:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def fit_channels(x: torch.Tensor, channels: int, source: str) -> torch.Tensor:
    """Grey images repeated to an RGB encoder's 3 channels; anything else that differs is refused."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    raise VisionError(f"{source} takes {channels}-channel images and the data has {x.shape[1]} channels: use an "
                      f"encoder made for {x.shape[1]}-channel images (repa.encoder = \"world\" trains one)")
