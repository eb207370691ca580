"""SD3's joint transformer block: image and text streams with their own weights, meeting in one attention.

Each stream has its own adaLN-Zero modulation, QKV, output projection and MLP. The two streams' queries, keys and
values are joined into one sequence (image tokens first, then text) for a single attention call, so every image
token sees every text token and the reverse. The last block of an MMDiT is "context-pre-only": nothing reads its
text output, so its text stream only supplies keys and values (no text queries, output projection or MLP).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from patchflow.models.attention import Attention, HeadRMSNorm, sdpa
from patchflow.models.blocks import Mlp, modulate, per_token


class JointAttention(nn.Module):
    """One multi-head attention over [image tokens; text tokens], with separate projections per stream.

    `text_out=False` (context-pre-only) keeps only the text keys and values: the text queries and output
    projection would compute tokens nothing reads. `qk_norm` adds an RMSNorm (eps 1e-6) per head on each
    stream's queries and keys.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, text_out: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.text_out = num_heads, dim // num_heads, text_out
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.text_qkv = nn.Linear(dim, (3 if text_out else 2) * dim)  # fused (q,) k, v of the text stream
        self.text_q_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm and text_out else nn.Identity()
        self.text_k_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.text_proj = nn.Linear(dim, dim) if text_out else None

    def forward(self, x: torch.Tensor, text: torch.Tensor, attn_mask: torch.Tensor | None = None,
                layout=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) image tokens; text: (B, L, D); attn_mask: (B, 1, 1, N + L) bool, True = a key to attend.
        `layout` (a video model's `models.spacetime.Layout`) rotates the image queries and keys (RoPE) and decides
        who attends to whom (factorized frames, packed samples); None is SD3's one joint attention per row.

        Returns the image output (B, N, D) and the text output (B, L, D), or None when text_out is False.
        """
        n, heads = x.shape[1], (self.num_heads, self.head_dim)
        q, k, v = self.qkv(x).unflatten(-1, (3, *heads)).unbind(2)  # each (B, N, H, hd): views, no copies
        q, k = self.q_norm(q), self.k_norm(k)
        if self.text_out:
            tq, tk, tv = self.text_qkv(text).unflatten(-1, (3, *heads)).unbind(2)
            tq = self.text_q_norm(tq)
        else:
            tq, (tk, tv) = None, self.text_qkv(text).unflatten(-1, (2, *heads)).unbind(2)
        tk = self.text_k_norm(tk)
        if layout is not None:
            q, k = layout.rotate(q), layout.rotate(k)
            image, txt = layout.joint(q, k, v, tq, tk, tv)
        else:
            q = torch.cat([q, tq], dim=1) if tq is not None else q
            k, v = torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
            # (B, S, H, hd) -> (B, H, S, hd) as strided views: SDPA reads them in place
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
            out = out.transpose(1, 2).flatten(2)  # (B, S, D)
            # each stream's rows copied out contiguous: a Linear on a strided slice falls back to a batched matmul
            image, txt = out[:, :n].contiguous(), out[:, n:].contiguous() if self.text_out else None
        return self.proj(image), self.text_proj(txt) if self.text_out else None


class JointBlock(nn.Module):
    """An MMDiT block: adaLN-Zero on both streams around one joint attention, then an MLP per stream.

    Image modulation: 6 chunks (shift, scale, gate for attention and MLP), or 9 with `dual_attention` (SD3.5's
    MMDiT-X: an extra image-only self-attention from the same normalised input, with its own shift, scale, gate).
    Text modulation: 6 chunks, or with `text_out=False` 2 (shift, scale): a continuous adaLN that only prepares
    the text keys and values of the last block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 dual_attention: bool = False, text_out: bool = True):
        super().__init__()
        self.text_out = text_out
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no weights: shared by both streams
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(dim, num_heads, qk_norm=qk_norm, text_out=text_out)
        self.attn2 = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm) if dual_attention else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (9 if dual_attention else 6) * dim))
        self.text_mlp = Mlp(dim, int(dim * mlp_ratio)) if text_out else None
        self.text_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (6 if text_out else 2) * dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None = None,
                layout=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) image tokens; text: (B, L, D); c: (B, D) condition; attn_mask: (B, 1, 1, N + L) bool.
        With a video `layout`, c is condition rows (B, K, D) (one per frame or packed sample) that
        `layout.index` spreads over the image tokens, and `layout.text_c` conditions the text stream.

        Returns (x, text), each updated; text is None after a context-pre-only block.
        """
        mod = self.adaLN_modulation(c)
        text_c = c if layout is None else layout.text_c
        if layout is not None and layout.index is not None:
            mod = mod[:, layout.index]  # (B, N, 9 or 6 D): each token its own frame's modulation
        mod = mod.chunk(9 if self.attn2 is not None else 6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod[:6]
        text_mod = self.text_adaLN_modulation(text_c)
        if layout is not None and layout.text_index is not None:
            text_mod = text_mod[:, layout.text_index]
        text_mod = text_mod.chunk(6 if self.text_out else 2, dim=-1)
        h = self.norm1(x)
        a, ta = self.attn(modulate(h, shift_a, scale_a), modulate(self.norm1(text), *text_mod[:2]), attn_mask,
                          layout)
        x = torch.addcmul(x, per_token(gate_a), a)
        if self.attn2 is not None:
            shift_2, scale_2, gate_2 = mod[6:]
            x = torch.addcmul(x, per_token(gate_2), self.attn2(modulate(h, shift_2, scale_2)))
        x = torch.addcmul(x, per_token(gate_m), self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
        if ta is None:
            return x, None
        gate_ta, shift_tm, scale_tm, gate_tm = text_mod[2:]
        text = torch.addcmul(text, per_token(gate_ta), ta)
        text = torch.addcmul(text, per_token(gate_tm),
                             self.text_mlp(modulate(self.norm2(text), shift_tm, scale_tm)))
        return x, text
