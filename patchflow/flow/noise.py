"""Noise correlated across a clip's frames (PYoCo, Ge et al. 2023, "Preserve Your Own Correlation"): consecutive
frames of a video are alike, so their noise should be too; each frame's noise stays N(0, I), only frames share it.

- "mixed": every frame is a shared part plus its own, eps_t = (alpha * shared + own_t) / sqrt(1 + alpha^2);
  any two frames correlate alpha^2 / (1 + alpha^2).
- "progressive": an AR(1) chain, eps_0 = own_0, eps_t = (alpha * eps_(t-1) + own_t) / sqrt(1 + alpha^2); frames k
  apart correlate (alpha / sqrt(1 + alpha^2))^k.
The same noise is used in training and sampling (`flow.frame_noise`), so the model learns the prior it samples from.
Pure functions of independent N(0, I) draws; T = 1 (images) is left as it is."""
from __future__ import annotations

import math

import torch

FRAME_NOISE = ("independent", "mixed", "progressive")


def _correlates(mode: str, shape: tuple[int, ...]) -> bool:
    """Whether `mode` changes noise of `shape`: only clips (B, C, T, H, W) of T > 1 have frames to share."""
    return mode != "independent" and len(shape) == 5 and shape[2] > 1


def correlate_frames(own: torch.Tensor, mode: str, alpha: float, shared: torch.Tensor | None = None) -> torch.Tensor:
    """own: (B, C, T, H, W) independent N(0, I); shared: (B, C, 1, H, W) N(0, I), needed by "mixed" -> noise of
    the same shape whose frames each stay N(0, I)."""
    if not _correlates(mode, tuple(own.shape)):
        return own
    scale = 1.0 / math.sqrt(1.0 + alpha * alpha)
    if mode == "mixed":
        if shared is None:
            raise ValueError("frame noise 'mixed' needs the shared draw (B, C, 1, H, W)")
        return (alpha * shared + own) * scale
    if mode == "progressive":
        frames = [own[:, :, 0]]
        for t in range(1, own.shape[2]):
            frames.append((alpha * frames[-1] + own[:, :, t]) * scale)
        return torch.stack(frames, dim=2)
    raise ValueError(f"unknown frame noise {mode!r}; choose one of: {', '.join(FRAME_NOISE)}")


def frame_noise(shape: tuple[int, ...], mode: str, alpha: float, draw) -> torch.Tensor:
    """Noise of `shape` (B, C, T, H, W) correlated by `mode`; draw(shape) -> N(0, I). The shared draw is made only for
    "mixed" (after the own one), so "independent" uses exactly the draws it always did."""
    own = draw(shape)
    shared = draw((*shape[:2], 1, *shape[3:])) if mode == "mixed" and _correlates(mode, shape) else None
    return correlate_frames(own, mode, alpha, shared)
