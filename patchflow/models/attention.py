"""Multi-head self-attention on PyTorch's scaled_dot_product_attention, with a fused QKV projection, and `sdpa`, the
one call every model's attention goes through."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# keys; a CPU training step at or under this many keys runs half-precision attention in fp32: PyTorch's CPU flash
# kernel is 1.4-4x slower backward in bf16 than in fp32 on short sequences, faster from 256 keys (bench/attention.py)
SHORT_KEYS = 160


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention; q: (B, H, Sq, hd), k, v: (B, H, Sk, hd) -> (B, H, Sq, hd) in q's dtype.
    On a CPU, bf16 or fp16 inputs (autocast's) that need gradients and at most SHORT_KEYS keys are attended in fp32
    (same kernel, more exact, faster there); everything else runs as given."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= SHORT_KEYS
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back to bf16
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm of each head's features (QK-norm). The weight follows the input's dtype: under bf16 autocast the
    queries and keys are bf16, and a bf16 input with an fp32 weight misses the fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # QK-norm (RMSNorm per head) keeps attention logits bounded at large scale (SD3, ViT-22B).
        self.q_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = sdpa(q, k, v, attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
