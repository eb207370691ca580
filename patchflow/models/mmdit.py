"""MMDiT (Esser et al. 2024, Stable Diffusion 3): a text-to-image transformer with joint image-text attention.

    image (B, C, H, W) -> patches + cropped sin-cos positions --.
    text (B, L, text_dim) -> Linear -----------------------------+-> JointBlock x depth -> adaLN + Linear -> unpatchify
    t (B,) -> sin-cos features -> MLP --+-> c (B, D): the adaLN condition of every block and of the final layer
    pooled (B, pooled_dim) -> MLP ------'

The function is diffusers' `SD3Transformer2DModel` (with `qk_norm="rms_norm"` and `dual_attention_layers` for
SD3.5), so `patchflow.convert.sd3` moves weights both ways exactly. t is in diffusers' units: sigma * 1000.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from patchflow.models.blocks import FinalLayer, xavier_linears, zero_linears
from patchflow.models.embed import CroppedPositions, PatchEmbed, TimestepEmbedder, unpatchify
from patchflow.models.joint import JointBlock
from patchflow.models.plumbing import BlockRunner
from patchflow.models.text_config import MMDiTConfig
from patchflow.models.text_inputs import bool_mask, check_config, check_text_inputs, image_input


class MMDiT(BlockRunner, nn.Module):
    """Text-to-image diffusion transformer. forward(x, t, text, pooled, text_mask) predicts the flow velocity."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        check_config("MMDiT", config, "mmdit")
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch = (1, p, p)
        self.x_embedder = PatchEmbed(config.in_channels, d, self.patch)
        self.pos_embed = CroppedPositions(d, config.pos_table_size, config.grid)
        self.t_embedder = TimestepEmbedder(d, freq_shift=0.0)  # SD3: [cos, sin] of t * 10000^(-k/128)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.text_embedder = nn.Linear(config.text_dim, d)
        dual = set(config.dual_attention_layers)
        self.blocks = nn.ModuleList(
            JointBlock(d, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm, dual_attention=i in dual,
                       text_out=i < config.depth - 1)  # nothing reads the last block's text: keys and values only
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(d, p * p * config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) timestep MLP, zeroed adaLN and output (identity blocks)."""
        xavier_linears(self)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_linears([m for block in self.blocks for m in (block.adaLN_modulation[-1], block.text_adaLN_modulation[-1])]
                     + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear])

    @staticmethod
    def key_mask(text_mask: torch.Tensor | None, num_image: int) -> torch.Tensor | None:
        """(B, L) text mask -> (B, 1, 1, N + L) bool keys for the joint attention (image keys always visible), or
        None when every text token is real: the unmasked attention kernel is faster and gives the same numbers."""
        text_mask = bool_mask(text_mask)
        if text_mask is None:
            return None
        if bool(text_mask.all()):  # one small device sync; lets SDPA take its fastest path
            return None
        image = text_mask.new_ones(text_mask.shape[0], num_image)
        return torch.cat([image, text_mask], dim=1)[:, None, None, :]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) or (B, C, 1, H, W); t: (B,) in 0..1000 (sigma * 1000); text: (B, L, text_dim) token
        features; pooled: (B, pooled_dim); text_mask: (B, L) bool or 0/1, True = a real token (padding is hidden
        from the attention's keys). Returns the velocity, shaped like x.
        """
        x, video = image_input("MMDiT", x)
        check_text_inputs("MMDiT", self.config, x, t, text, pooled, text_mask)
        p = self.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        self.pos_embed.check(h, w, p)
        tokens = self.x_embedder(x[:, :, None])
        tokens = tokens + self.pos_embed(h, w).to(tokens.dtype)  # streams stay in the compute dtype, as in DiT
        text = self.text_embedder(text)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)
        mask = self.key_mask(text_mask, h * w)
        self.mark_dynamic((tokens, 0, 1), (text, 0, 1), (c, 0), (mask, 0, 3))
        for i, block in enumerate(self.blocks):
            tokens, text = self.run_block(i, block, tokens, text, c, mask)
        out = unpatchify(self.final_layer(tokens, c), (1, h, w), self.patch)
        return out if video else out[:, :, 0]
