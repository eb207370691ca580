"""A character stream for text the image must show: the glyph text of a prompt, one token per character, in order.

Word-piece encoders see "42" as one opaque token (MiniLM), so a model must learn each number on its own. This
encoder reads the prompt's glyph text, its quoted spans ("..." or '...') and its words that hold a digit, in
prompt order, space-separated (the text to render, as Glyph-ByT5 and TextDiffuser take it), and gives each
character a token: a one-hot of the character (printable ASCII, else one "other" class) beside a sinusoidal code
of its position. It has nothing to learn itself: the model's trainable text projection turns the one-hots into a
learned character table and the position codes into learned positions, so "42" and "24" differ by where each digit
sits. Joined after MiniLM or CLIP (`text.encoder = "minilm,chars"`) it is a sequence block of its own, SD3's way
for T5: no pooled vector, zero-padded to the joint width.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from patchflow.text.base import FrozenTextEncoder, TextEmbedding, TextEncoderError

CHARS_VERSION = 1
FIRST, LAST = 32, 126                 # printable ASCII; anything else is the one "other" class
VOCAB = LAST - FIRST + 2
POSITION_DIM = 32
DEFAULT_MAX_LENGTH, MAX_POSITIONS = 32, 256
_GLYPHS = re.compile(r"\"([^\"]*)\"|'([^']*)'|(\S*\d\S*)")


def glyph_text(prompt: str) -> str:
    """The characters of `prompt` the image must show: quoted spans and digit-holding words, in order.

    glyph_text('the number 42 in green') == "42"; glyph_text('a sign that says "open 24h"') == "open 24h"."""
    parts = []
    for quoted_double, quoted_single, word in _GLYPHS.findall(prompt):
        part = quoted_double or quoted_single or word.strip(".,;:!?()[]")
        if part:
            parts.append(part)
    return " ".join(parts)


def char_ids(text: str) -> list[int]:
    return [ord(c) - FIRST if FIRST <= ord(c) <= LAST else VOCAB - 1 for c in text]


class CharacterEncoder(FrozenTextEncoder):
    """texts (B) -> tokens (B, L, VOCAB + POSITION_DIM): L the longest glyph text (<= max_length characters)."""

    def __init__(self, max_length: int | None = None, fit_max_length: bool = False):
        super().__init__()
        length = DEFAULT_MAX_LENGTH if max_length is None else int(max_length)
        if length > MAX_POSITIONS:
            if not fit_max_length:
                raise TextEncoderError(f"the chars encoder takes at most {MAX_POSITIONS} characters, asked for "
                                       f"max_length = {length}")
            length = MAX_POSITIONS
        if length < 1:
            raise TextEncoderError(f"max_length must be >= 1, got {length}")
        self.max_length, self.name, self.pooled_dim = length, "chars", 0
        self.dim = VOCAB + POSITION_DIM
        position = torch.arange(MAX_POSITIONS, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(POSITION_DIM // 2, dtype=torch.float64) / (POSITION_DIM // 2))
        table = torch.cat([torch.sin(position * freq), torch.cos(position * freq)], 1).float()
        self.positions = nn.Parameter(table, requires_grad=False)  # a parameter: gives the encoder a device, dtype
        self._warned = False
        self.freeze()

    def identity_parts(self) -> dict:
        return {"kind": "chars", "version": CHARS_VERSION, "max_length": self.max_length, "vocab": [FIRST, LAST],
                "position_dim": POSITION_DIM}

    def embed(self, texts: list[str]) -> TextEmbedding:
        rows = []
        for text in texts:
            ids = char_ids(glyph_text(text))
            if len(ids) > self.max_length:
                if not self._warned:
                    import warnings

                    warnings.warn(f"glyph text of {len(ids)} characters cut to text.max_length = {self.max_length}",
                                  stacklevel=3)
                    self._warned = True
                ids = ids[:self.max_length]
            n = len(ids)
            one_hot = torch.zeros(n, VOCAB, device=self.device)
            one_hot[torch.arange(n), torch.tensor(ids, dtype=torch.long)] = 1.0
            rows.append((torch.cat([one_hot, self.positions[:n]], 1), one_hot.new_zeros(0)))
        return TextEmbedding.from_rows(rows, self.dim, 0, device=self.device)
