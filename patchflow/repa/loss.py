"""The alignment terms of REPA / CREPA and the pooling of encoder features to a model's token grid. Pure functions.

Token order is the models' patch order: frame-major, then rows, then columns (N = T' * H' * W').
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_features(features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """features (B, T, h, w, D): an encoder's patch features per frame of the model's input -> (B, N, D) on the
    token grid (T', H', W') (average-pooled; a coarser feature grid is repeated)."""
    if features.ndim != 5:
        raise ValueError(f"features must be (B, T, h, w, D), got shape {tuple(features.shape)}")
    f = features.permute(0, 4, 1, 2, 3).float()  # (B, D, T, h, w)
    if tuple(f.shape[2:]) != tuple(grid):
        f = F.adaptive_avg_pool3d(f, tuple(grid))
    return f.flatten(2).transpose(1, 2)


def alignment(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA: projected hidden states and encoder features, both (B, N, D) -> (B,) the negative cosine similarity
    averaged over tokens (-1 when every token points where its feature does)."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(1)


def cross_frame_alignment(projected: torch.Tensor, target: torch.Tensor, frames: int, window: int = 1
                          ) -> torch.Tensor:
    """CREPA's cross-frame term: each token frame's projected hidden states against the features of the frames up
    to `window` away on either side (same place), weighted exp(-distance). (B, N, D) with N = frames * S -> (B,);
    zeros for single frames."""
    b, n, d = projected.shape
    if frames < 2:
        return projected.new_zeros(b, dtype=torch.float32)
    if n % frames:
        raise ValueError(f"{n} tokens do not split into {frames} frames")
    p = projected.float().view(b, frames, n // frames, d)
    y = target.float().view(b, frames, n // frames, d)
    total, weights = 0.0, 0.0
    for k in range(1, min(window, frames - 1) + 1):
        near = torch.cat([F.cosine_similarity(p[:, k:], y[:, :-k], dim=-1),    # frame t against t - k
                          F.cosine_similarity(p[:, :-k], y[:, k:], dim=-1)], 1)  # frame t against t + k
        total = total + math.exp(-k) * near.mean((1, 2))
        weights += math.exp(-k)
    return -total / weights


def repa_loss(projected: torch.Tensor, features: torch.Tensor, grid: tuple[int, int, int], cross_frame: float = 0.0,
              window: int = 1) -> torch.Tensor:
    """The alignment term of one batch, (B,): projected hidden states (B, N, D) of the token grid (T', H', W'),
    features (B, T, h, w, D) of the clean input; with cross_frame > 0 and several token frames, CREPA's term too."""
    target = token_features(features, grid)
    if target.shape != projected.shape:
        raise ValueError(f"REPA: {tuple(projected.shape[:2])} projected tokens but features for "
                         f"{tuple(target.shape[:2])} on the grid {tuple(grid)}")
    out = alignment(projected, target)
    if cross_frame > 0 and grid[0] > 1:
        out = out + cross_frame * cross_frame_alignment(projected, target, grid[0], window)
    return out
