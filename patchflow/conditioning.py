"""Conditioning: what the data's targets become for the model, between the data and the model.

Every model takes `forward(x, t, **cond)`; the trainer asks this step for `cond` and never branches on its kind,
and the sampler asks it for the pair (cond, null) of classifier-free guidance.
- Labels pass through as {"y"}; dropped to the null class `num_classes` for guidance.
- Captions go through a frozen text encoder (or its on-disk embedding cache) into {"text", "text_mask",
  "pooled"}; each encoder's part is dropped to the empty prompt for guidance, independently per encoder.
- A codec run has no conditioning.
Random drops are drawn for the global batch (world x local) and sliced per process, so one process and N
processes train on exactly the same conditions.
"""
from __future__ import annotations

import torch

from patchflow.flow.guidance import drop_labels


class LabelConditioning:
    """Class labels: cond = {"y": labels}, label `num_classes` is the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, dropout_prob: float, device: torch.device | str = "cpu"):
        self.num_classes, self.dropout_prob, self.device = num_classes, dropout_prob, torch.device(device)

    def train(self, y: torch.Tensor, generator: torch.Generator | None, shard: tuple[int, int]) -> dict:
        """Training cond for labels y (B,): each dropped to the null class with dropout_prob (global-batch draw)."""
        y = y.to(self.device, non_blocking=True)
        return {"y": drop_labels(y, self.num_classes, self.dropout_prob, generator, shard)}

    def train_pair(self, y: torch.Tensor, generator: torch.Generator | None, shard: tuple[int, int]):
        """(training cond, its null) for a teacher's guidance in distillation."""
        cond = self.train(y, generator, shard)
        return cond, {"y": torch.full_like(cond["y"], self.num_classes)}

    def pair(self, labels, negative=None) -> tuple[dict, dict]:
        """(cond, null) for guided sampling of `labels` (B,); there is no negative label."""
        if negative is not None:
            raise ValueError("a negative prompt needs a text model; this run is class-conditional")
        y = torch.as_tensor(labels, dtype=torch.long, device=self.device).reshape(-1)
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {y.min().item()}..{y.max().item()}")
        return {"y": y}, {"y": torch.full_like(y, self.num_classes)}


class TextConditioning:
    """Prompts -> {"text": (B, L, D), "text_mask": (B, L) bool, "pooled": (B, P)} through a frozen encoder.

    `encoder` is a text encoder or its embedding cache (`patchflow.text`): anything with
    `encode(texts, drop=None)`; `num_encoders` is how many encoders it joins (dropped independently).
    """

    def __init__(self, encoder, dropout_prob: float, device: torch.device | str = "cpu"):
        self.encoder, self.dropout_prob, self.device = encoder, dropout_prob, torch.device(device)
        self.num_encoders = getattr(encoder, "num_encoders", 1)

    def _cond(self, emb) -> dict:
        return {"text": emb.tokens.to(self.device, non_blocking=True),
                "text_mask": emb.mask.to(self.device, non_blocking=True),
                "pooled": emb.pooled.to(self.device, non_blocking=True)}

    def train(self, captions: list[str], generator: torch.Generator | None, shard: tuple[int, int]) -> dict:
        """Training cond for a batch of captions; each encoder's part of each caption is replaced by its encoding
        of the empty prompt with the dropout probability (global-batch draw)."""
        from patchflow.text import draw_dropout

        drop = None
        if self.dropout_prob > 0:
            drop = draw_dropout(self.num_encoders, len(captions), self.dropout_prob, generator, shard)
        return self._cond(self.encoder.encode(list(captions), drop=None if drop is None else drop.cpu()))

    def train_pair(self, captions: list[str], generator: torch.Generator | None, shard: tuple[int, int]):
        """(training cond, its null) for a teacher's guidance in distillation: one encoding of the captions (with
        the training drops) and of the empty prompt, so their token lengths agree."""
        from patchflow.text import draw_dropout

        n = len(captions)
        drop = torch.zeros(self.num_encoders, n, dtype=torch.bool)
        if self.dropout_prob > 0:
            drop = draw_dropout(self.num_encoders, n, self.dropout_prob, generator, shard).cpu()
        both = self._cond(self.encoder.encode(list(captions) * 2, drop=torch.cat([drop, torch.ones_like(drop)], 1)))
        return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}

    def pair(self, prompts: list[str], negative: str | list[str] | None = None) -> tuple[dict, dict]:
        """(cond, null) for guided sampling: null is the empty prompt, or the negative prompt(s). Both are encoded
        in one batch so their token lengths agree."""
        prompts = list(prompts)
        if negative is None:
            negative = ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each")
        both = self._cond(self.encoder.encode(prompts + negatives))
        n = len(prompts)
        return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}


class NoConditioning:
    """For models that take no condition (a codec run's autoencoder)."""

    def train(self, y, generator: torch.Generator | None, shard: tuple[int, int]) -> dict:
        return {}

    def pair(self, targets, negative=None) -> tuple[dict, dict]:
        return {}, {}

    def train_pair(self, y, generator: torch.Generator | None, shard: tuple[int, int]) -> tuple[dict, dict]:
        return {}, {}


def build_conditioning(cfg, device: torch.device | str = "cpu", text_encoder=None):
    """The conditioning step of a run. A text run loads its encoder (frozen) unless `text_encoder` is given
    (an encoder or embedding cache the caller prepared)."""
    if cfg.kind.codec:
        return NoConditioning()
    if cfg.kind.prompts:
        if text_encoder is None:
            text_encoder = load_run_text_encoder(cfg, device)
        return TextConditioning(text_encoder, cfg.text.dropout, device)
    return LabelConditioning(cfg.model.num_classes, cfg.model.class_dropout_prob, device)


def load_run_text_encoder(cfg, device: torch.device | str = "cpu"):
    """The run's text encoder ([text] encoder, max_length), checked against the model's text widths."""
    from patchflow.checks import ConfigError
    from patchflow.text import load_text_encoder

    encoder = load_text_encoder(cfg.text.encoder, max_length=cfg.text.max_length, padding=cfg.text.padding)
    m = cfg.model
    for key, have in (("text_dim", encoder.dim), ("pooled_dim", encoder.pooled_dim)):
        if getattr(m, key) != have:
            raise ConfigError(f"model.{key} = {getattr(m, key)} does not match text.encoder = {cfg.text.encoder!r}, "
                              f"which gives {have}: set model.{key} = {have}")
    return encoder.to(device) if hasattr(encoder, "to") else encoder
