"""Multi-head self-attention on PyTorch's scaled_dot_product_attention, with a fused QKV projection."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
