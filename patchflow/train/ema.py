"""Exponential moving average of model weights, updated in place with fused foreach ops."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """With warmup, min(decay, (1 + n) / (10 + n)) so a short run's EMA is not stuck at init."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema = [p for p in self.model.parameters()]
        new = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, new, 1.0 - decay)
        self.updates += 1
