"""What every text encoder shares: the embedding a batch of prompts becomes, the error type, the frozen-encoder base
class with caption dropout, and the dropout draw of classifier-free guidance.

The interface (`FrozenTextEncoder`, and `JointTextEncoder` / `TextEmbeddingCache`, which follow it):
  encode(texts, drop=None) -> TextEmbedding   drop: (num_encoders, B) bool, True = use the empty prompt ""
  dim, pooled_dim, max_length, name, num_encoders, encoders, device
  identity() -> str                            stable hash of weights, config, tokenizer and max_length
  join(parts) -> TextEmbedding                 how the encoders' own embeddings (in `encoders` order) combine
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn

from patchflow.flow.draws import global_coins


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded or an input it cannot take; the message says what and how to fix it."""


@dataclass
class TextEmbedding:
    """A batch of encoded prompts.

    tokens  (B, L, D) float32; zeros wherever mask is False
    mask    (B, L) bool; True = a real token. L is the longest real row of the batch (never beyond max_length)
    pooled  (B, P) float32; one vector per prompt (P = 0 for encoders without one, e.g. T5)
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self):
        b, length = self.mask.shape if self.mask.dim() == 2 else (None, None)
        if self.tokens.dim() != 3 or self.tokens.shape[:2] != (b, length) or self.mask.dtype != torch.bool:
            raise TextEncoderError(f"a TextEmbedding needs tokens (B, L, D) and a bool mask (B, L); got tokens "
                                   f"{tuple(self.tokens.shape)} and mask {tuple(self.mask.shape)} {self.mask.dtype}")
        if self.pooled.dim() != 2 or self.pooled.shape[0] != b:
            raise TextEncoderError(f"a TextEmbedding needs pooled (B, P) with B = {b}, got {tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    @property
    def pooled_dim(self) -> int:
        return self.pooled.shape[1]

    def to(self, device, non_blocking: bool = False) -> TextEmbedding:
        return TextEmbedding(self.tokens.to(device, non_blocking=non_blocking),
                             self.mask.to(device, non_blocking=non_blocking),
                             self.pooled.to(device, non_blocking=non_blocking))

    def __getitem__(self, index) -> TextEmbedding:
        """Rows `index` (an int keeps a batch of one; a slice, list or tensor of indices, or a bool (B,) mask)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextEmbedding(self.tokens[index], self.mask[index], self.pooled[index])

    def padded(self, length: int) -> TextEmbedding:
        """The same rows padded (zeros, mask False) to `length` tokens; length must be >= L."""
        extra = length - self.tokens.shape[1]
        if extra < 0:
            raise TextEncoderError(f"cannot pad {self.tokens.shape[1]} tokens to a shorter length {length}")
        if extra == 0:
            return self
        b, _, d = self.tokens.shape
        return TextEmbedding(torch.cat([self.tokens, self.tokens.new_zeros(b, extra, d)], 1),
                             torch.cat([self.mask, self.mask.new_zeros(b, extra)], 1), self.pooled)

    def trimmed(self) -> TextEmbedding:
        """The same rows without the trailing token columns that no row uses (e.g. after taking a subset)."""
        used = self.mask.any(0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 0
        return TextEmbedding(self.tokens[:, :length], self.mask[:, :length], self.pooled)

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per prompt (tokens (n_i, D), pooled (P,)) cut to its n_i real tokens; assumes right padding (real
        tokens first), as every single encoder here produces."""
        counts = self.mask.sum(1).tolist()
        return [(self.tokens[i, :n], self.pooled[i]) for i, n in enumerate(counts)]

    @staticmethod
    def from_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], dim: int, pooled_dim: int,
                  device=None) -> TextEmbedding:
        """Stack per-prompt (tokens (n_i, D), pooled (P,)) rows, right-padded to the longest n_i."""
        length = max((t.shape[0] for t, _ in rows), default=0)
        tokens = torch.zeros(len(rows), length, dim, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        pooled = torch.zeros(len(rows), pooled_dim, device=device)
        for i, (t, p) in enumerate(rows):
            tokens[i, :t.shape[0]] = t
            mask[i, :t.shape[0]] = True
            pooled[i] = p
        return TextEmbedding(tokens, mask, pooled)

    @staticmethod
    def cat(parts: list[TextEmbedding]) -> TextEmbedding:
        """Concatenate batches on the batch axis, padding each to the longest L."""
        if not parts:
            raise TextEncoderError("TextEmbedding.cat needs at least one embedding")
        length = max(p.tokens.shape[1] for p in parts)
        parts = [p.padded(length) for p in parts]
        return TextEmbedding(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]),
                             torch.cat([p.pooled for p in parts]))


def check_texts(texts) -> list[str]:
    """`texts` as a list of str, or TextEncoderError naming the first entry that is not a string."""
    if isinstance(texts, str):
        raise TextEncoderError("encode() takes a list of prompts, got one string; wrap it: encode([text])")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TextEncoderError(f"prompt {i} is {type(t).__name__}, not str; use \"\" for the unconditional "
                                   f"prompt")
    return texts


def check_drop(drop, num_encoders: int, batch: int) -> torch.Tensor | None:
    """`drop` as a CPU (num_encoders, batch) bool tensor (a (batch,) one is accepted for a single encoder)."""
    if drop is None:
        return None
    drop = torch.as_tensor(drop).cpu()
    if drop.dim() == 1 and num_encoders == 1:
        drop = drop[None]
    if drop.dtype != torch.bool or tuple(drop.shape) != (num_encoders, batch):
        raise TextEncoderError(f"drop must be a bool tensor of shape (num_encoders, batch) = ({num_encoders}, "
                               f"{batch}), got {drop.dtype} {tuple(drop.shape)}; draw it with draw_dropout()")
    return drop


def draw_dropout(num_encoders: int, batch: int, prob: float, generator: torch.Generator | None = None,
                 shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Which prompts each encoder replaces by the empty prompt: (num_encoders, batch) bool, independent per encoder
    and sample with probability `prob`. The draw covers the global batch (world x batch) and keeps this rank's
    columns, so N processes drop what one process would (`flow.draws.global_coins`, as `flow.guidance.drop_labels`
    draws; with one encoder the draw is the same numbers). prob 0 draws nothing."""
    if not 0 <= prob <= 1:
        raise TextEncoderError(f"caption dropout probability must be in [0, 1], got {prob}")
    rank, world = shard
    if not 0 <= rank < world:
        raise TextEncoderError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    device = generator.device if generator is not None else torch.device("cpu")
    return global_coins((num_encoders,), batch, prob, shard, generator, device)


def digest(obj) -> str:
    """sha256 of a JSON-able object (keys sorted), hex."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class FrozenTextEncoder(nn.Module, ABC):
    """One frozen encoder: weights never train, it always runs in eval mode without autograd.

    Subclasses implement `embed(texts)` (the batch right-padded to its longest prompt, padding zeroed) and
    `identity_parts()`, and set `dim`, `pooled_dim`, `max_length`, `name`. `encode` adds caption dropout.
    Outputs are plain (not inference-mode) tensors, so a trained model may take them as inputs.
    """

    dim: int
    pooled_dim: int
    max_length: int
    name: str

    def __init__(self):
        super().__init__()
        self._empty_by_device: dict[str, TextEmbedding] = {}

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Stays in eval mode (no dropout) even when a parent module is put in training mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def encoders(self) -> tuple[FrozenTextEncoder, ...]:
        return (self,)

    @property
    def num_encoders(self) -> int:
        return 1

    def join(self, parts: list[TextEmbedding]) -> TextEmbedding:
        """A single encoder's embedding is its own (see JointTextEncoder.join for several)."""
        if len(parts) != 1:
            raise TextEncoderError(f"{self.name} is one encoder; join() got {len(parts)} embeddings")
        return parts[0]

    @abstractmethod
    def embed(self, texts: list[str]) -> TextEmbedding:
        """texts (B) -> TextEmbedding right-padded to the longest prompt, padded positions zero."""

    @abstractmethod
    def identity_parts(self) -> dict:
        """What decides this encoder's outputs (weights hash, config, tokenizer, max_length), JSON-able."""

    def identity(self) -> str:
        """Stable hex hash of what decides the outputs, plus the weights' dtype; caches are keyed on it."""
        return digest({**self.identity_parts(), "dtype": str(next(self.parameters()).dtype)})

    def empty(self) -> TextEmbedding:
        """The encoding of the empty prompt "" (the unconditional input), (1, L0, D), computed once per device."""
        key = str(self.device)
        if key not in self._empty_by_device:
            with torch.no_grad():
                self._empty_by_device[key] = self.embed([""])
        return self._empty_by_device[key]

    def encode(self, texts: list[str], drop: torch.Tensor | None = None) -> TextEmbedding:
        """texts (B) -> TextEmbedding; drop (1, B) or (B,) bool replaces those prompts by the empty prompt.

        Pads to the longest row of the result; prompts beyond max_length are cut with one warning per call."""
        texts = check_texts(texts)
        drop = check_drop(drop, 1, len(texts))
        with torch.no_grad():
            if drop is None or not drop.any():
                return self.embed(texts) if texts else self._none()
            kept = [i for i in range(len(texts)) if not drop[0, i]]
            emb = self.embed([texts[i] for i in kept]) if kept else self._none()
            rows = [self.empty().rows()[0]] * len(texts)
            for i, row in zip(kept, emb.rows()):
                rows[i] = row
            return TextEmbedding.from_rows(rows, self.dim, self.pooled_dim, device=self.device)

    def _none(self) -> TextEmbedding:
        """The embedding of no prompts: (0, 0, D)."""
        return TextEmbedding.from_rows([], self.dim, self.pooled_dim, device=self.device)
