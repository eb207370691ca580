"""Several frozen text encoders as one, joined SD3's way.

The encoders with a pooled vector (CLIPs; MiniLM counts as one) form one block: their token features are
concatenated on channels. Each encoder without one (T5) is a block of its own. Every block is zero-padded on
channels to the widest block (SD3: CLIP-L 768 + CLIP-G 1280 = 2048, padded to T5's 4096) and the blocks are
concatenated on the sequence axis, pooled block first; masks follow the same layout. Pooled vectors are
concatenated in encoder order. With no T5 the result is the channel concatenation alone.

Shapes: tokens (B, L_pooled + sum L_t5, D) with D = max(sum of pooled encoders' dims, each T5's dim);
pooled (B, sum of pooled dims). Within the pooled block every encoder is padded to the block's longest row; a
position is real (mask True) where any of them has a real token there.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchflow.text.base import TextEmbedding, TextEncoderError, check_drop, check_texts, digest

JOINT_VERSION = 1


class JointTextEncoder(nn.Module):
    """encoders: single frozen encoders, e.g. [CLIP-L, CLIP-G, T5]; caption dropout is drawn per encoder."""

    def __init__(self, encoders: list):
        super().__init__()
        if not encoders:
            raise TextEncoderError("a joint text encoder needs at least one encoder")
        nested = [e.name for e in encoders if e.num_encoders != 1]
        if nested:
            raise TextEncoderError(f"cannot nest joint encoders ({nested[0]}); list the single encoders instead")
        self.encoders = nn.ModuleList(encoders)
        pooled = [e for e in encoders if e.pooled_dim > 0]
        sequences = [e for e in encoders if e.pooled_dim == 0]
        widths = ([sum(e.dim for e in pooled)] if pooled else []) + [e.dim for e in sequences]
        self.dim = max(widths)
        self.pooled_dim = sum(e.pooled_dim for e in encoders)
        self.max_length = max((e.max_length for e in pooled), default=0) + sum(e.max_length for e in sequences)
        self.name = "+".join(e.name for e in encoders)

    @property
    def num_encoders(self) -> int:
        return len(self.encoders)

    @property
    def device(self) -> torch.device:
        return self.encoders[0].device

    def train(self, mode: bool = True) -> JointTextEncoder:
        """Stays in eval mode: the encoders are frozen."""
        return super().train(False)

    def identity(self) -> str:
        return digest({"joint": JOINT_VERSION, "parts": [e.identity() for e in self.encoders]})

    def encode(self, texts: list[str], drop: torch.Tensor | None = None) -> TextEmbedding:
        """texts (B) -> joined TextEmbedding; drop (num_encoders, B) bool: encoder i uses the empty prompt for
        sample b where drop[i, b]."""
        texts = check_texts(texts)
        drop = check_drop(drop, self.num_encoders, len(texts))
        return self.join([e.encode(texts, None if drop is None else drop[i]) for i, e in enumerate(self.encoders)])

    def join(self, parts: list[TextEmbedding]) -> TextEmbedding:
        """The encoders' own embeddings, in `encoders` order -> the joined embedding (see the module doc)."""
        if len(parts) != self.num_encoders:
            raise TextEncoderError(f"join() needs one embedding per encoder ({self.num_encoders}), got {len(parts)}")
        pooled = [p for p, e in zip(parts, self.encoders) if e.pooled_dim > 0]
        blocks = []
        if pooled:
            length = max(p.tokens.shape[1] for p in pooled)
            pooled = [p.padded(length) for p in pooled]
            blocks.append(TextEmbedding(torch.cat([p.tokens for p in pooled], 2),
                                        torch.stack([p.mask for p in pooled]).any(0), pooled[0].pooled))
        blocks += [p for p, e in zip(parts, self.encoders) if e.pooled_dim == 0]
        tokens = torch.cat([F.pad(b.tokens, (0, self.dim - b.tokens.shape[2])) for b in blocks], 1)
        mask = torch.cat([b.mask for b in blocks], 1)
        return TextEmbedding(tokens, mask, torch.cat([p.pooled for p in parts], 1))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, pooled_dim={self.pooled_dim}, max_length={self.max_length}"
