"""DiT (Peebles & Xie, 2023): patchify, adaLN-Zero transformer blocks, final layer, unpatchify.

Latents are (B, C, T, H, W); an image is T = 1 and may also be passed as (B, C, H, W), so a converted
official checkpoint is called exactly like the official `DiT.forward(x, t, y)` with t in 0..999.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from patchflow.models.blocks import AdaLNBlock, FinalLayer, xavier_linears, zero_linears
from patchflow.models.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_3d, unpatchify
from patchflow.models.plumbing import BlockRunner

# name -> (depth, hidden_size, num_heads). S/B/L/XL are the paper's; Mini and Micro are CPU sizes.
DIT_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "Mini": (6, 256, 4),
    "Micro": (4, 128, 4),
}


@dataclass
class DiTConfig:
    """Everything needed to build a DiT. `preset` ("DiT-XL/2", "DiT-Mini/4", ...) names the size it came from."""

    arch: str = "dit"
    preset: str = ""
    input_size: int = 32           # latent height = width (the default sampling size; any multiple of patch works)
    frames: int = 1                # latent frames T; 1 for images
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False      # predict a variance too (DiT's DDPM hybrid loss): out channels = 2 * in
    qk_norm: bool = False
    time_freq_shift: float = 0.0   # 0: the paper's timestep frequencies; 1: diffusers' (divides by half - 1)
    mlp_norm_eps: float = 1e-6     # 1e-6: the paper; 1e-5: diffusers' pre-MLP LayerNorm

    @staticmethod
    def preset_fields(name: str) -> dict:
        """'DiT-S/2' -> {'depth': 12, 'hidden_size': 384, 'num_heads': 6, 'patch_size': 2}."""
        sizes = ", ".join(f"DiT-{s}/{{2,4,8}}" for s in DIT_SIZES)
        try:
            family, patch = name.removeprefix("DiT-").split("/")
            depth, hidden, heads = DIT_SIZES[family]
            patch = {"2": 2, "4": 4, "8": 8}[patch]  # not int(): "0", " 4", "4_0" are not presets
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"unknown DiT preset {name!r:.80}; known: {sizes}") from None
        return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTConfig":
        return cls(**{"preset": name, **cls.preset_fields(name), **overrides})

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes cannot work."""
        if self.arch != "dit":
            raise ValueError(f"model.arch must be 'dit' for a DiT config, got {self.arch!r}")
        most = {"input_size": 8192, "frames": 4096, "in_channels": 1024, "patch_size": 64, "hidden_size": 16384,
                "depth": 1024, "num_heads": 1024, "num_classes": 1_000_000}  # far past any DiT; keeps shapes buildable
        for name, limit in most.items():
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
            if getattr(self, name) > limit:
                raise ValueError(f"model.{name} must be <= {limit}, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"model.patch_size={self.patch_size} does not divide model.input_size={self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos positions)")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if not 0 < self.mlp_ratio <= 64 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"model.mlp_ratio must be in (0, 64] with hidden_size * mlp_ratio >= 1, got {self.mlp_ratio}")
        if not 0 < self.mlp_norm_eps < 1:
            raise ValueError(f"model.mlp_norm_eps must be > 0 and < 1, got {self.mlp_norm_eps}")
        if not 0 <= self.time_freq_shift < 128:  # the timestep embedding divides by (128 - time_freq_shift)
            raise ValueError(f"model.time_freq_shift must be in [0, 128), got {self.time_freq_shift}")


class DiT(BlockRunner, nn.Module):
    """Class-conditional diffusion transformer. forward(x, t, y) predicts noise / velocity per pixel."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch = (1, p, p)
        self.x_embedder = PatchEmbed(config.in_channels, d, self.patch)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.time_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.blocks = nn.ModuleList(
            AdaLNBlock(d, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm, mlp_norm_eps=config.mlp_norm_eps)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, p * p * config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output (identity blocks)."""
        xavier_linears(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_linears([block.adaLN_modulation[-1] for block in self.blocks]
                     + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear])

    def pos_embed(self, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        """Fixed sin-cos positions for a token grid: (1, N, D)."""
        return sincos_3d(self.config.hidden_size, grid).to(device=like.device, dtype=like.dtype)[None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, H, W) or (B, C, H, W); t: (B,) in 0..999; y: (B,) labels, num_classes = null.

        Returns (B, C_out, T, H, W) (or 4D if x was 4D); C_out = 2C when learn_sigma.
        """
        image = x.ndim == 4
        if image:
            x = x.unsqueeze(2)
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"DiT expects x of shape (B, {self.config.in_channels}, [T,] H, W), got {tuple(x.shape)}")
        _, _, frames, height, width = x.shape
        pt, ph, pw = self.patch
        if height % ph or width % pw:
            raise ValueError(f"input {height}x{width} is not divisible by the patch size {ph}")
        grid = (frames // pt, height // ph, width // pw)
        tokens = self.x_embedder(x)
        tokens = tokens + self.pos_embed(grid, tokens)
        c = self.t_embedder(t) + self.y_embedder(y)
        self.mark_dynamic((tokens, 0, 1), (c, 0))
        for i, block in enumerate(self.blocks):
            tokens = self.run_block(i, block, tokens, c)
        out = unpatchify(self.final_layer(tokens, c), grid, self.patch)
        return out.squeeze(2) if image else out
