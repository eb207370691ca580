"""The REPA projector: a small MLP from the diffusion model's token width to the encoder's feature width."""
from __future__ import annotations

import torch
import torch.nn as nn


class Projector(nn.Module):
    """tokens (B, N, hidden) -> (B, N, feature_dim); three linear layers with SiLU between (REPA's head)."""

    def __init__(self, hidden_size: int, feature_dim: int, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, feature_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)
