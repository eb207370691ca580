"""Embeddings shared by every model: patches, fixed sin-cos positions, timesteps, class labels."""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn
from einops import rearrange


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """x: (B, C, T, H, W) -> tokens (B, T'*H'*W', C*pt*ph*pw), tokens in (t, h, w) raster order."""
    pt, ph, pw = patch
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """tokens: (B, T'*H'*W', pt*ph*pw*C) -> (B, C, T, H, W). Channel is the fastest axis, as in DiT."""
    (t, h, w), (pt, ph, pw) = grid, patch
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


class PatchEmbed(nn.Module):
    """Non-overlapping patches (tubelets when pt > 1) projected to `dim`.

    A linear layer on flattened patches is the same function as DiT's strided conv; its weight is the conv
    weight flattened (dim, C*pt*ph*pw), and it avoids the conv's im2col overhead on CPU.
    """

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int], bias: bool = True):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Linear(in_channels * math.prod(self.patch), dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) -> (B, N, dim)."""
        return self.proj(patchify(x, self.patch))


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Fixed 1D table, [sin, cos] halves, frequencies 1/10000^(k/(dim/2)). pos: (N,) -> (N, dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


@lru_cache(maxsize=32)
def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Positions for a (T, H, W) token grid in raster order: (T*H*W, dim), float32.

    With T == 1 this is exactly DiT's 2D table: first half encodes the column, second half the row.
    With T > 1 a temporal 1D table is added on top, so frames share spatial codes.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need hidden size divisible by 4, got {dim}")
    t, h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    spatial = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    table = spatial.repeat(t, 1)
    if t > 1:
        table = table + sincos_1d(dim, torch.arange(t)).repeat_interleave(h * w, dim=0)
    return table.float()


class CroppedPositions(nn.Module):
    """A fixed square table of 2D sin-cos positions, centre-cropped to each input's patch grid (SD3).

    The table has `table` patches a side, laid over the training grid of `grid` patches: patch i of the table sits
    at position i * grid / table, so a table twice the grid holds positions in half steps. A (h, w) input takes the
    centre crop starting at row (table - h) // 2, column (table - w) // 2: one model runs at other sizes and aspect
    ratios up to table x table patches. Per token the first half of the features encodes the column, the second
    half the row, as in DiT.
    """

    def __init__(self, dim: int, table: int, grid: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"2D sin-cos positions need hidden size divisible by 4, got {dim}")
        self.dim, self.table = dim, table
        # positions in float32 first, then sin-cos in float64, as diffusers builds its table (equal to the last bit)
        pos = torch.arange(table, dtype=torch.float32) / (table / grid)
        # one axis serves rows and columns (the table is square): (table, dim / 2), not the (table^2, dim) table
        self.register_buffer("axis", sincos_1d(dim // 2, pos).float(), persistent=False)

    def check(self, h: int, w: int, patch: int) -> None:
        """ValueError when an (h, w) patch grid does not fit the table."""
        if h > self.table or w > self.table:
            most = self.table * patch
            raise ValueError(f"input of {h * patch}x{w * patch} ({h}x{w} patches) exceeds the position table of "
                             f"{self.table}x{self.table} patches (model.pos_embed_max_size = {self.table}): inputs "
                             f"may be at most {most}x{most}; train with a larger model.pos_embed_max_size to go beyond")

    def forward(self, h: int, w: int) -> torch.Tensor:
        """Positions of an (h, w) patch grid in raster order: (1, h * w, dim)."""
        top, left = (self.table - h) // 2, (self.table - w) // 2
        rows, cols = self.axis[top:top + h], self.axis[left:left + w]
        half = self.dim // 2
        table = torch.cat([cols[None].expand(h, w, half), rows[:, None].expand(h, w, half)], dim=-1)
        return table.reshape(1, h * w, self.dim)


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """exp(-ln(max_period) * k / (dim/2 - freq_shift)); DiT uses shift 0, diffusers shift 1."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: [cos, sin] features then a 2-layer SiLU MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.register_buffer("freqs", timestep_frequencies(freq_dim, freq_shift=freq_shift), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) in the model's units (DiT: 0..999) -> (B, dim)."""
        args = t.float()[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. The last row is the null class used for classifier-free guidance.

    Dropping labels for guidance training is the trainer's job (`flow.guidance.drop_labels`): drawn there
    for the whole global batch, it is the same on one process or many.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B,) ints in [0, num_classes] (num_classes = null) -> (B, dim)."""
        return self.embedding_table(y)
