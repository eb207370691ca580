"""How a video model's tokens meet: 3D positions (sin-cos, RoPE), full or factorized spacetime attention, and
packing of differently sized samples into one sequence with a block-diagonal mask (NaViT).

A `Layout` describes one forward's tokens: which condition row (sample, frame) each image token takes its adaLN
modulation from, which text tokens belong to which sample, the rotary angles of the image tokens, and who attends
to whom. The joint blocks ask it to mix queries, keys and values; the temporal blocks ask it to mix frames.
Attention is PyTorch's: `scaled_dot_product_attention`; where samples are packed, `flex_attention` with a block
mask on CUDA (it skips the blocks the mask leaves empty), and elsewhere one SDPA call per sample on slices of the
packed sequence (full attention) or SDPA with a boolean mask (factorized attention).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchflow.models.attention import Attention, sdpa
from patchflow.models.blocks import modulate, per_token
from patchflow.models.embed import sincos_1d

ATTENTION = ("full", "factorized")
POSITIONS = ("sincos", "rope")


# ---- positions ---------------------------------------------------------------------------------------------------
def temporal_sincos(dim: int, frames: int) -> torch.Tensor:
    """(frames, dim) temporal sin-cos codes relative to frame 0: frame 0 gets zeros, so a one-frame clip has exactly
    an image model's positions and an image checkpoint keeps its function."""
    table = sincos_1d(dim, torch.arange(frames))
    return (table - table[:1]).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Features of a head given to (time, rows, columns) rotations: a quarter to time, the rest split between rows
    and columns, each even (CogVideoX / Open-Sora's 3D RoPE split)."""
    t = 2 * (head_dim // 8)
    hw = (head_dim - t) // 2 // 2 * 2
    if t < 2 or hw < 2:
        raise ValueError(f"3D RoPE needs a head dimension of at least 8, got {head_dim}")
    return t, hw, head_dim - t - hw


def rope_angles(head_dim: int, grid: tuple[int, int, int], offset: tuple[float, float] = (0.0, 0.0),
                theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (T*H*W, head_dim / 2) of a (T, H, W) token grid in raster order; `offset` shifts the rows and
    columns (a centred grid: other sizes keep the middle where it was). Features left over by the split (head_dim
    not a multiple of 8) get angle 0 (no rotation)."""
    t, h, w = grid
    dims = rope_split(head_dim)
    pos = torch.stack(torch.meshgrid(torch.arange(t, dtype=torch.float64), torch.arange(h, dtype=torch.float64) +
                                     offset[0], torch.arange(w, dtype=torch.float64) + offset[1], indexing="ij"),
                      dim=-1).reshape(-1, 3)
    parts = [pos[:, a:a + 1] / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
             for a, d in enumerate(dims)]
    angles = torch.cat(parts, dim=1)
    pad = head_dim // 2 - angles.shape[1]
    return F.pad(angles, (0, pad)).float() if pad else angles.float()


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved feature pairs. x: (B, N, heads, hd); angles: (N, hd / 2)."""
    cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


# ---- attention ---------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, mask=None):
    """(B, S, H, hd) in and out; `mask` a boolean (B or 1, 1, Sq, Sk), or a flex_attention BlockMask."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask is not None and not isinstance(mask, torch.Tensor):
        out = _flex()(q, k, v, block_mask=mask)
    else:
        out = sdpa(q, k, v, mask)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _flex():
    """flex_attention, compiled where it has fused kernels (CUDA); eager (unfused, for tests) elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention


def dense_or_block_mask(allowed, q_ids: tuple, k_ids: tuple, block: bool | None = None):
    """The attention mask of a packed sequence: allowed(q, k) -> bool for query and key id tuples, from per-token
    id fields (each a (S,) long tensor: sample, frame, place). CUDA (or block=True) gets a flex_attention BlockMask
    (empty blocks skipped); elsewhere a dense boolean (1, 1, Sq, Sk) for SDPA."""
    device = q_ids[0].device
    if block if block is not None else device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, i, j):
            return allowed(tuple(f[i] for f in q_ids), tuple(f[j] for f in k_ids))

        return create_block_mask(mask_mod, None, None, len(q_ids[0]), len(k_ids[0]), device=device)
    return allowed(tuple(f[:, None] for f in q_ids), tuple(f[None] for f in k_ids))[None, None]


@dataclass
class Layout:
    """The tokens of one VideoDiT forward.

    index: (N,) condition row of each image token (None: one row per batch row); text_c: the text stream's condition
    (B, D) or rows with text_index (L,); angles: (N, hd/2) RoPE angles of the image tokens or None; frames: (T, P),
    latent frames and patches per frame of an unpacked batch (None when packed); text_keys: (B, L) bool, the real
    text tokens (None: all real); joint_mask, image_rows_mask, temporal_mask: a packed sequence's masks (None
    unpacked);
    factorized: image queries see only their own frame (and the text) in the joint blocks.
    """

    index: torch.Tensor | None
    text_c: torch.Tensor
    text_index: torch.Tensor | None = None
    angles: torch.Tensor | None = None
    frames: tuple[int, int] | None = None
    text_keys: torch.Tensor | None = None
    joint_mask: object = None
    image_rows_mask: object = None  # joint_mask's image query rows: the last block has no text queries
    temporal_mask: object = None
    segments: list | None = None  # packed full attention on CPUs: (image slice, text slice) of every sample
    factorized: bool = False

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.angles is None else rotate(x, self.angles)

    def joint(self, q, k, v, tq, tk, tv):
        """Joint attention of image (B, N, H, hd) and text (B, L, H, hd) streams (tq None: no text queries).
        Returns the image (B, N, D) and text (B, L, D) outputs (text None without text queries)."""
        n = q.shape[1]
        if self.segments is not None:  # packed, without a block-sparse kernel: each sample's attention alone
            return _segment_joint(self.segments, q, k, v, tq, tk, tv)
        if self.joint_mask is not None:  # packed: one sequence, a block-diagonal mask
            out = _sdpa(torch.cat([q, tq], 1) if tq is not None else q, torch.cat([k, tk], 1), torch.cat([v, tv], 1),
                        self.joint_mask if tq is not None else self.image_rows_mask)
            out = out.flatten(2)
            return out[:, :n].contiguous(), out[:, n:].contiguous() if tq is not None else None
        keys = None if self.text_keys is None else self.text_keys
        if not self.factorized:
            mask = None if keys is None else torch.cat([keys.new_ones(keys.shape[0], n), keys], 1)[:, None, None]
            out = _sdpa(torch.cat([q, tq], 1) if tq is not None else q, torch.cat([k, tk], 1), torch.cat([v, tv], 1),
                        mask).flatten(2)
            return out[:, :n].contiguous(), out[:, n:].contiguous() if tq is not None else None
        # factorized: each frame's image queries see that frame and the text; the text sees everything
        b, (t, p) = q.shape[0], self.frames
        per_frame = lambda z: z.reshape(b * t, p, *z.shape[2:])  # noqa: E731
        text_rep = lambda z: z.repeat_interleave(t, dim=0)  # noqa: E731
        mask = None
        if keys is not None:
            mask = torch.cat([keys.new_ones(b, p), keys], 1).repeat_interleave(t, dim=0)[:, None, None]
        image = _sdpa(per_frame(q), torch.cat([per_frame(k), text_rep(tk)], 1),
                      torch.cat([per_frame(v), text_rep(tv)], 1), mask)
        image = image.reshape(b, n, -1)
        if tq is None:
            return image, None
        mask = None if keys is None else torch.cat([keys.new_ones(b, n), keys], 1)[:, None, None]
        txt = _sdpa(tq, torch.cat([k, tk], 1), torch.cat([v, tv], 1), mask)
        return image, txt.flatten(2)

    def temporal(self, q, k, v):
        """Attention along time between the tokens of one spatial place. (B, N, H, hd) -> (B, N, D)."""
        if self.temporal_mask is not None:
            return _sdpa(q, k, v, self.temporal_mask).flatten(2)
        b, (t, p) = q.shape[0], self.frames
        along_time = lambda z: z.reshape(b, t, p, *z.shape[2:]).transpose(1, 2).reshape(b * p, t, *z.shape[2:])  # noqa
        out = _sdpa(along_time(q), along_time(k), along_time(v))
        return out.reshape(b, p, t, -1).transpose(1, 2).reshape(b, t * p, -1)


def _segment_joint(segments, q, k, v, tq, tk, tv):
    """Packed joint attention as one small attention per sample (varlen attention by slicing): the linear layers ran
    on the packed sequence, and no query meets another sample's keys, so nothing is computed and masked away.
    q, k, v: (1, N, H, hd) image streams; tq (or None), tk, tv: (1, L, H, hd) text streams."""
    image, text = torch.empty_like(q), None if tq is None else torch.empty_like(tq)
    for img, txt in segments:
        keys, values = torch.cat([k[:, img], tk[:, txt]], 1), torch.cat([v[:, img], tv[:, txt]], 1)
        queries = q[:, img] if tq is None else torch.cat([q[:, img], tq[:, txt]], 1)
        out = _sdpa(queries, keys, values)
        n = img.stop - img.start
        image[:, img] = out[:, :n]
        if tq is not None:
            text[:, txt] = out[:, n:]
    return image.flatten(2), None if text is None else text.flatten(2)


class TemporalBlock(nn.Module):
    """Factorized models' attention along time (Latte, Open-Sora 1.x): each spatial place's tokens attend across
    frames, with adaLN (shift, scale, gate) from the frame's condition. The modulation starts at zero, so the
    block starts as the identity and an image model's weights keep their function."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, layout: Layout) -> torch.Tensor:
        """x: (B, N, D) image tokens; c: condition rows (B, K, D) spread over tokens by layout.index."""
        mod = self.adaLN_modulation(c)
        shift, scale, gate = (mod if layout.index is None else mod[:, layout.index]).chunk(3, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        a = self.attn
        q, k, v = a.qkv(h).unflatten(-1, (3, a.num_heads, a.head_dim)).unbind(2)
        q, k = layout.rotate(a.q_norm(q)), layout.rotate(a.k_norm(k))
        return torch.addcmul(x, per_token(gate), a.proj(layout.temporal(q, k, v)))
