"""Transformer pieces shared by the models: MLP, adaLN modulation, the adaLN-Zero block, the final layer."""
from __future__ import annotations

import torch
import torch.nn as nn

from patchflow.models.attention import Attention


def xavier_linears(model: nn.Module) -> None:
    """Every Linear of `model` xavier-uniform with zero bias: DiT's base initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def zero_linears(layers) -> None:
    """Zero these Linears (adaLN modulations, output layers), so a fresh block or model starts as the identity."""
    for layer in layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def per_token(v: torch.Tensor) -> torch.Tensor:
    """A modulation (B, D), one per sample, -> (B, 1, D) to broadcast over tokens; (B, N, D) (one per token) stays."""
    return v.unsqueeze(1) if v.ndim == 2 else v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D); shift, scale: (B, D) per sample or (B, N, D) per token."""
    return torch.addcmul(per_token(shift), x, 1 + per_token(scale))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNBlock(nn.Module):
    """DiT block with adaLN-Zero: the condition regresses shift, scale and gate for attention and MLP.

    `mlp_norm_eps` exists because diffusers' DiT uses 1e-5 before the MLP where the paper uses 1e-6.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 norm_eps: float = 1e-6, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) tokens; c: (B, D) condition."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_a.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        return torch.addcmul(x, gate_m.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from tokens to patch pixels (pt*ph*pw*C_out)."""

    def __init__(self, dim: int, patch_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.linear = nn.Linear(dim, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D); c: (B, D), or condition rows (B, K, D) with `index` (N,) naming each token's row."""
        mod = self.adaLN_modulation(c)
        shift, scale = (mod if index is None else mod[:, index]).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
