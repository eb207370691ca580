"""CrossDiT (PixArt-alpha, Chen et al. 2023): a text-to-image DiT whose image tokens read the text by cross-attention.

    image (B, C, H, W) -> patches + cropped sin-cos positions -> CrossDiTBlock x depth -> final layer -> unpatchify
                                                   keys, values --^     ^ (B, 6D)            ^ shift, scale
    text (B, L, text_dim) -> caption MLP (Linear-GELU-Linear) --'       |                    |
    t (B,) -> sin-cos features -> MLP --+-> c (B, D) -> SiLU-Linear ----' adaLN-single       |
    pooled (B, pooled_dim) -> MLP ------'        '-------------------------------------------'

It is the baseline of SD3's joint attention (`patchflow.models.mmdit.MMDiT`): built from the same `MMDiTConfig`
size fields and called the same way, forward(x, t, text, pooled, text_mask), so one conditioning feeds both.
Departures from PixArt-alpha, the first two so that the comparison is fair:
- PixArt has no pooled text vector. Here it goes through a small MLP and is added to the timestep embedding, as
  in the MMDiT, so both models receive the same information.
- Positions are a fixed table of `config.pos_table_size` patches a side, centre-cropped to each input (SD3's
  scheme, with the MMDiT's spacing), so other sizes and aspect ratios sample as they do with the MMDiT.
- Init: PixArt zeroes only the cross-attention output and the final Linear; here the adaLN-single Linear and the
  gate rows of every block's table start at zero too, so each block starts as the identity (adaLN-Zero, as DiT).
- No learned null caption: the unconditional input is the encoded empty prompt, made by the conditioning.
t is in 0..1000 (flow time * 1000).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from patchflow.models.attention import Attention, HeadRMSNorm, sdpa
from patchflow.models.blocks import Mlp, modulate, xavier_linears, zero_linears
from patchflow.models.embed import CroppedPositions, PatchEmbed, TimestepEmbedder, unpatchify
from patchflow.models.plumbing import BlockRunner
from patchflow.models.text_config import MMDiTConfig
from patchflow.models.text_inputs import bool_mask, check_config, check_text_inputs, image_input


class CaptionProjection(nn.Module):
    """PixArt's caption MLP: text features (B, L, text_dim) -> (B, L, D), Linear-GELU(tanh)-Linear."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(text)))


class CrossAttention(nn.Module):
    """Multi-head attention of image queries over text keys and values, with RMSNorm per head when qk_norm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # fused keys and values of the text
        self.q_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = HeadRMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) image tokens; text: (B, L, D); key_mask: (B, 1, 1, L) bool, True = a key to attend.
        Returns (B, N, D)."""
        heads = (self.num_heads, self.head_dim)
        q = self.q_norm(self.q(x).unflatten(-1, heads))  # (B, N, H, hd)
        k, v = self.kv(text).unflatten(-1, (2, *heads)).unbind(2)  # each (B, L, H, hd)
        # (B, S, H, hd) -> (B, H, S, hd) as strided views: SDPA reads them in place
        out = sdpa(q.transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2), key_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossDiTBlock(nn.Module):
    """PixArt-alpha block: modulated self-attention, plain cross-attention to the text, modulated MLP.

    adaLN-single: the (B, 6D) modulation comes from the model, shared by every block; each block adds its own
    learnable (6, D) `scale_shift_table` to it to get shift, scale and gate for the attention and the MLP. The
    cross-attention reads the raw residual stream (no norm, no modulation) and adds to it, as in PixArt.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))  # set by CrossDiT.initialize_weights

    def forward(self, x: torch.Tensor, text: torch.Tensor, modulation: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) image tokens; text: (B, L, D) projected captions; modulation: (B, 6D) from adaLN-single;
        key_mask: (B, 1, 1, L) bool or None. Returns (B, N, D)."""
        chunks = self.scale_shift_table + modulation.unflatten(1, (6, -1))  # (B, 6, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = chunks.unbind(1)
        x = torch.addcmul(x, gate_a.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        x = x + self.cross_attn(x, text, key_mask)
        return torch.addcmul(x, gate_m.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_m, scale_m)))


class CrossDiTFinalLayer(nn.Module):
    """PixArt's final layer: LayerNorm, shift and scale = the condition (B, D) + a learnable (2, D) table, then a
    Linear from tokens to patch pixels (B, N, D) -> (B, N, patch_dim)."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))  # set by CrossDiT.initialize_weights
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + c.unsqueeze(1)).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class CrossDiT(BlockRunner, nn.Module):
    """Text-to-image diffusion transformer with cross-attention. forward(x, t, text, pooled, text_mask) predicts
    the flow velocity."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        check_config("CrossDiT", config, "crossdit")
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch = (1, p, p)
        # embed
        self.x_embedder = PatchEmbed(config.in_channels, d, self.patch)
        self.pos_embed = CroppedPositions(d, config.pos_table_size, config.grid)
        self.t_embedder = TimestepEmbedder(d, freq_shift=0.0)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.caption_projection = CaptionProjection(config.text_dim, d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # adaLN-single: one modulation for all blocks
        # blocks
        self.blocks = nn.ModuleList(
            CrossDiTBlock(d, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm) for _ in range(config.depth)
        )
        # final layer
        self.final_layer = CrossDiTFinalLayer(d, p * p * config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; N(0, 0.02) for the timestep, pooled and caption MLPs (DiT, PixArt); PixArt's N(0, 1/D)
        tables. Every block starts as the identity: the shared adaLN-single Linear and each table's gate rows are
        zero (so self-attention and MLP are gated off, adaLN-Zero) and the cross-attention output projection is
        zero (PixArt); the final Linear is zero (PixArt), so a fresh model outputs exactly 0. Gradients reach the
        final Linear first, then the gates and cross-attention projections, then everything (tested)."""
        d = self.config.hidden_size
        xavier_linears(self)
        for mlp in (self.t_embedder.mlp, self.pooled_embedder):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        nn.init.normal_(self.caption_projection.fc1.weight, std=0.02)
        nn.init.normal_(self.caption_projection.fc2.weight, std=0.02)
        zero_linears([self.t_block[-1], self.final_layer.linear] + [block.cross_attn.proj for block in self.blocks])
        with torch.no_grad():
            for block in self.blocks:
                nn.init.normal_(block.scale_shift_table, std=d ** -0.5)
                block.scale_shift_table[[2, 5]] = 0  # the attention and MLP gates
            nn.init.normal_(self.final_layer.scale_shift_table, std=d ** -0.5)

    @staticmethod
    def key_mask(text_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, L) text mask -> (B, 1, 1, L) bool keys for the cross-attention, or None when every token is real:
        the unmasked kernel is faster and gives the same numbers."""
        text_mask = bool_mask(text_mask)
        if text_mask is None:
            return None
        # one device sync for both questions
        every_token, every_row = torch.stack([text_mask.all(), text_mask.any(1).all()]).tolist()
        if not every_row:  # a query with no key to attend to makes SDPA return NaN
            raise ValueError("text_mask has a row with no real token; every caption needs at least one (the empty "
                             "prompt's encoding has its special tokens)")
        return None if every_token else text_mask[:, None, None, :]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) or (B, C, 1, H, W); t: (B,) in 0..1000 (flow time * 1000); text: (B, L, text_dim) token
        features; pooled: (B, pooled_dim); text_mask: (B, L) bool or 0/1, True = a real token (padding is hidden
        from the cross-attention's keys). Returns the velocity, shaped like x.
        """
        x, video = image_input("CrossDiT", x)
        check_text_inputs("CrossDiT", self.config, x, t, text, pooled, text_mask)
        if text.shape[1] < 1:
            raise ValueError("text must have at least one token: cross-attention needs a key to attend to")
        p = self.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        self.pos_embed.check(h, w, p)
        # embed
        tokens = self.x_embedder(x[:, :, None])
        tokens = tokens + self.pos_embed(h, w).to(tokens.dtype)
        text = self.caption_projection(text)
        c = self.t_embedder(t) + self.pooled_embedder(pooled)  # PixArt has no pooled vector; see the module doc
        modulation = self.t_block(c)
        mask = self.key_mask(text_mask)
        self.mark_dynamic((tokens, 0, 1), (text, 0, 1), (modulation, 0), (mask, 0, 3))
        # blocks
        for i, block in enumerate(self.blocks):
            tokens = self.run_block(i, block, tokens, text, modulation, mask)
        # final layer
        out = unpatchify(self.final_layer(tokens, c), (1, h, w), self.patch)
        return out if video else out[:, :, 0]
