"""Conditioning: what the data's targets become for the model, between the data and the model.

Every model takes `forward(x, t, **cond)`; the trainer asks this step for `cond` and never branches on its kind.
Labels pass through (dropped to the null class for classifier-free guidance); a codec run has no conditioning.
"""
from __future__ import annotations

import torch

from patchflow.flow.guidance import drop_labels


class LabelConditioning:
    """Class labels: cond = {"y": labels}, label `num_classes` is the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, dropout_prob: float):
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def train(self, y: torch.Tensor, generator: torch.Generator | None, shard: tuple[int, int]) -> dict:
        """Training cond for labels y (B,): each dropped to the null class with dropout_prob (global-batch draw)."""
        return {"y": drop_labels(y, self.num_classes, self.dropout_prob, generator, shard)}

    def null(self, y: torch.Tensor) -> dict:
        return {"y": torch.full_like(y, self.num_classes)}


class NoConditioning:
    """For models that take no condition (a codec run's autoencoder)."""

    def train(self, y: torch.Tensor, generator: torch.Generator | None, shard: tuple[int, int]) -> dict:
        return {}

    def null(self, y: torch.Tensor) -> dict:
        return {}


def build_conditioning(cfg):
    if cfg.model.arch == "autoencoder":
        return NoConditioning()
    return LabelConditioning(cfg.model.num_classes, cfg.model.class_dropout_prob)
