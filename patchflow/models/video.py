"""VideoDiT: text-to-video the Sora way, an MMDiT over spacetime patches. An image is a one-frame clip.

    clip (B, C, T, H, W) -> tubelets (pt x p x p) + 3D positions -------------.
    text (B, L, text_dim) -> Linear --------------------------------------------+-> JointBlock [+ TemporalBlock]
    t (B,) or (B, T) per latent frame -> sin-cos -> MLP --+-> condition rows        x depth -> adaLN + Linear
    pooled (B, pooled_dim) -> MLP ------------------------'   (one per frame)        -> unpatchify

- Positions (`model.positions`): "sincos" adds MMDiT's cropped 2D table plus temporal codes that are zero at frame
  0; "rope" rotates the image queries and keys by 3D RoPE (time, rows, columns).
- Token mixing (`model.attention`): "full" is one joint attention over the text and every frame's patches;
  "factorized" restricts the joint attention to each frame (the text still sees every frame) and follows every
  block with attention along time (`TemporalBlock`, Latte / Open-Sora 1.x), zero-initialised.
- Per-frame timesteps: `t` of shape (B, T) gives each latent frame its own noise level (a given first frame at
  t = 0 for image-to-video, the frames of a clip being extended). Each frame's tokens are modulated by their own
  frame's condition; the text stream by the noisiest frame's.
- Packing: `forward` also takes a list of clips of different sizes; they run as one sequence with a
  block-diagonal attention mask (NaViT) and come back as a list, each exactly as it would alone.

Loading an image MMDiT (`load_image_weights`) gives the same function on one-frame clips: the parameter names are
MMDiT's, frame 0's temporal codes are zero and the temporal blocks start as the identity.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from patchflow.models.blocks import FinalLayer, xavier_linears, zero_linears
from patchflow.models.embed import CroppedPositions, PatchEmbed, TimestepEmbedder, unpatchify
from patchflow.models.joint import JointBlock
from patchflow.models.plumbing import BlockRunner
from patchflow.models.spacetime import Layout, TemporalBlock, dense_or_block_mask, rope_angles, temporal_sincos
from patchflow.models.text_config import VideoDiTConfig
from patchflow.models.text_inputs import bool_mask, check_text


class VideoDiT(BlockRunner, nn.Module):
    """Text-to-video diffusion transformer. forward(x, t, text, pooled, text_mask) predicts the flow velocity."""

    block_lists = ("blocks", "temporal_blocks")  # both are compiled; checkpointing recomputes the joint blocks only

    def __init__(self, config: VideoDiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, p, pt = config.hidden_size, config.patch_size, config.temporal_patch
        self.patch = (pt, p, p)
        self.head_dim = d // config.num_heads
        self.x_embedder = PatchEmbed(config.in_channels, d, self.patch)
        self.pos_embed = CroppedPositions(d, config.pos_table_size, config.grid)  # size checks also under RoPE
        self.t_embedder = TimestepEmbedder(d, freq_shift=0.0)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.text_embedder = nn.Linear(config.text_dim, d)
        self.blocks = nn.ModuleList(
            JointBlock(d, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm, text_out=i < config.depth - 1)
            for i in range(config.depth))
        self.factorized = config.attention == "factorized"
        self.temporal_blocks = nn.ModuleList(
            TemporalBlock(d, config.num_heads, qk_norm=config.qk_norm) for _ in range(config.depth)
        ) if self.factorized else None
        self.final_layer = FinalLayer(d, pt * p * p * config.out_channels)
        # packed attention: None = flex_attention block masks on CUDA; elsewhere one attention per sample (full
        # attention) or SDPA with a dense mask (factorized); True / False force block masks / the CPU paths
        self.block_masks = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MMDiT's (DiT's) init; the temporal blocks' modulation zeroed too, so they start as the identity."""
        xavier_linears(self)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [m for block in self.blocks for m in (block.adaLN_modulation[-1], block.text_adaLN_modulation[-1])]
        zero += [b.adaLN_modulation[-1] for b in self.temporal_blocks or ()]
        zero_linears(zero + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear])

    # ---- inputs ------------------------------------------------------------------------------------------------
    def _grid(self, shape, what: str) -> tuple[int, int, int]:
        """(C, T, H, W) of one clip -> its token grid (T', h, w), checked against the patch and position table."""
        c, t, h, w = shape
        pt, p, _ = self.patch
        if c != self.config.in_channels:
            raise ValueError(f"VideoDiT expects {what} with {self.config.in_channels} channels (B, C, T, H, W), got "
                             f"shape {tuple(shape)}")
        if t % pt or h % p or w % p or min(t, h, w) < 1:
            raise ValueError(f"{what} of {t} frames, {h}x{w}: the patch {pt}x{p}x{p} must divide frames, height "
                             f"and width (model.temporal_patch, model.patch_size); pad or crop the clip")
        self.pos_embed.check(h // p, w // p, p)
        return t // pt, h // p, w // p

    def _embed(self, x: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clips (B, C, T, H, W) -> tokens (B, T'hw, D) with additive positions, and RoPE angles (or None)."""
        t, h, w = grid
        tokens = self.x_embedder(x)
        if self.config.positions == "rope":
            g = self.config.grid
            return tokens, rope_angles(self.head_dim, grid, ((g - h) / 2, (g - w) / 2)).to(x.device)
        d = tokens.shape[-1]
        pos = self.pos_embed(h, w)[0].repeat(t, 1)
        if t > 1:
            pos = pos + temporal_sincos(d, t).to(pos.device).repeat_interleave(h * w, dim=0)
        return tokens + pos.to(tokens.dtype), None

    def _frame_times(self, t: torch.Tensor, frames: int, b: int) -> torch.Tensor:
        """t: (B,) or (B, T) -> (B, T') times of the token frames (a tubelet takes its first frame's time)."""
        if t.ndim == 1 and t.shape[0] == b:
            return t[:, None].expand(b, frames)
        if t.ndim == 2 and t.shape[0] == b and t.shape[1] == frames * self.patch[0]:
            return t[:, ::self.patch[0]]
        raise ValueError(f"t must have shape ({b},) (one timestep per clip) or ({b}, {frames * self.patch[0]}) (one "
                         f"per latent frame, flow time * 1000), got {tuple(t.shape)}")

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, x, t, text: torch.Tensor, pooled: torch.Tensor, text_mask: torch.Tensor | None = None):
        """x: clips (B, C, T, H, W) (an image is T = 1), or a list of B clips (C, T_i, H_i, W_i) of any sizes,
        packed into one sequence; t: (B,) in 0..1000 (sigma * 1000) or (B, T) per latent frame (a list: per clip
        (T_i,) or a scalar); text: (B, L, text_dim); pooled: (B, pooled_dim); text_mask: (B, L), True = a real token.
        Returns the velocity, shaped like x (a list for a list).
        """
        if isinstance(x, (list, tuple)):
            return self._packed(list(x), t, text, pooled, text_mask)
        if x.ndim != 5:
            raise ValueError(f"VideoDiT expects clips (B, C, T, H, W) or a list of (C, T, H, W), got shape "
                             f"{tuple(x.shape)}")
        b = x.shape[0]
        grid = self._grid(x.shape[1:], "x")
        check_text(self.config, b, text, pooled, text_mask)
        tokens, angles = self._embed(x, grid)
        pooled_c = self.pooled_embedder(pooled)
        times = self._frame_times(t, grid[0], b)  # (B, T'), checked
        if t.ndim == 2 and bool((times != times[:, :1]).any()):  # one condition row per token frame
            c = self.t_embedder(times.reshape(-1)).view(b, grid[0], -1) + pooled_c[:, None]
            text_c = self.t_embedder(times.amax(1)) + pooled_c
            index = torch.arange(grid[0], device=x.device).repeat_interleave(grid[1] * grid[2])
        else:  # one timestep per clip: one condition row, as an image model
            c = text_c = self.t_embedder(times[:, 0]) + pooled_c
            index = None
        mask = bool_mask(text_mask)
        keys = None if mask is None or bool(mask.all()) else mask
        layout = Layout(index=index, text_c=text_c, angles=angles, frames=(grid[0], grid[1] * grid[2]),
                        text_keys=keys, factorized=self.factorized)
        out = self._blocks(tokens, self.text_embedder(text), c, layout)
        return unpatchify(self.final_layer(out, c, index), grid, self.patch)

    def _blocks(self, tokens: torch.Tensor, text: torch.Tensor, c: torch.Tensor, layout: Layout) -> torch.Tensor:
        self.mark_dynamic((tokens, 0, 1), (text, 0, 1), (c, 0), (layout.text_c, 0), (layout.index, 0),
                          (layout.text_index, 0), (layout.angles, 0), (layout.text_keys, 0, 1))
        for i, block in enumerate(self.blocks):
            tokens, text = self.run_block(i, block, tokens, text, c, None, layout)
            if self.temporal_blocks is not None:
                tokens = self.temporal_blocks[i](tokens, c, layout)
        return tokens

    def _packed(self, xs: list, t, text, pooled, text_mask) -> list:
        """Clips of different sizes as one sequence: each sample's text and patches attend only to each other."""
        b = len(xs)
        if b == 0:
            raise ValueError("an empty list of clips")
        if any(not isinstance(v, torch.Tensor) or v.ndim != 4 for v in xs):
            raise ValueError("packed clips must each be a tensor (C, T, H, W)")
        check_text(self.config, b, text, pooled, text_mask)
        device = xs[0].device
        ts = list(t) if isinstance(t, (list, tuple)) else list(t.unbind(0))
        if len(ts) != b:
            raise ValueError(f"t must hold one timestep (or one per latent frame) for each of the {b} clips")
        mask = bool_mask(text_mask)
        pooled_c = self.pooled_embedder(pooled)
        tokens, angles, rows, index, grids = [], [], [], [], []
        ids, text_ids, texts = [], [], []  # (sample, frame row, place) of every image / text token
        row = place = 0
        for i, x in enumerate(xs):
            grid = self._grid(x.shape, f"clip {i}")
            f, hw = grid[0], grid[1] * grid[2]
            tok, ang = self._embed(x[None], grid)
            tokens.append(tok[0])
            if ang is not None:
                angles.append(ang)
            ti = torch.as_tensor(ts[i], device=device).float().reshape(-1)
            times = ti.expand(f) if ti.numel() == 1 else self._frame_times(ti[None], f, 1)[0]
            rows.append(self.t_embedder(times) + pooled_c[i])
            frame_rows = torch.arange(row, row + f, device=device).repeat_interleave(hw)
            index.append(frame_rows)
            places = torch.arange(place, place + hw, device=device).repeat(f)
            ids.append(torch.stack([torch.full_like(frame_rows, i), frame_rows, places]))
            real = text[i] if mask is None else text[i][mask[i]]
            texts.append(real)
            text_ids.append(torch.tensor([[i], [-1], [-1]], device=device).expand(3, real.shape[0]))
            row, place = row + f, place + hw
            grids.append(grid)
        text_rows = self.t_embedder(torch.stack([torch.as_tensor(v, device=device).float().reshape(-1).amax()
                                                 for v in ts])) + pooled_c
        img_ids, txt_ids = torch.cat(ids, 1), torch.cat(text_ids, 1)
        all_ids = tuple(torch.cat([img_ids, txt_ids], 1))  # (sample, frame row, place) fields, image then text
        img_ids = tuple(img_ids)
        factorized = self.factorized

        def joint(q, k):  # same sample; factorized: an image query sees only its own frame's patches (and text)
            ok = q[0] == k[0]
            if factorized:
                ok = ok & ((q[1] == k[1]) | (q[1] < 0) | (k[1] < 0))
            return ok

        c = torch.cat(rows)[None]
        block = self.block_masks
        if not factorized and (block is False or (block is None and device.type != "cuda")):
            # no block-sparse kernel: full attention sample by sample (a dense mask would be quadratic in the pack)
            image_ends = torch.tensor([g[0] * g[1] * g[2] for g in grids]).cumsum(0).tolist()
            text_ends = torch.tensor([len(x) for x in texts]).cumsum(0).tolist()
            segments = [(slice(a, b), slice(ta, tb)) for a, b, ta, tb in
                        zip([0] + image_ends[:-1], image_ends, [0] + text_ends[:-1], text_ends)]
            layout = Layout(index=torch.cat(index), text_c=text_rows[None], text_index=txt_ids[0],
                            angles=torch.cat(angles) if angles else None, segments=segments)
        else:
            layout = Layout(index=torch.cat(index), text_c=text_rows[None], text_index=txt_ids[0],
                            angles=torch.cat(angles) if angles else None,
                            joint_mask=dense_or_block_mask(joint, all_ids, all_ids, block),
                            image_rows_mask=dense_or_block_mask(joint, img_ids, all_ids, block),
                            temporal_mask=dense_or_block_mask(lambda q, k: q[2] == k[2], img_ids, img_ids, block)
                            if factorized else None)
        out = self._blocks(torch.cat(tokens)[None], self.text_embedder(torch.cat(texts))[None], c, layout)
        out = self.final_layer(out, c, layout.index)[0]
        sizes = [g[0] * g[1] * g[2] for g in grids]
        return [unpatchify(o[None], g, self.patch)[0] for o, g in zip(out.split(sizes), grids)]


def load_image_weights(model: VideoDiT, state: dict) -> list[str]:
    """Load an image MMDiT's state dict into a VideoDiT; returns the video-only parameters left at their init (the
    temporal blocks, which start as the identity). With model.temporal_patch > 1 the image patch weights are spread
    evenly over the tubelet's frames and its output repeated for each, so a still clip is embedded as the image
    was and every frame of a tubelet gets the image's output."""
    state = dict(state)
    pt = model.patch[0]
    key = "x_embedder.proj.weight"
    if pt > 1 and key in state:
        w = state[key]
        c, p = model.config.in_channels, model.patch[1]
        state[key] = (w.view(w.shape[0], c, 1, p, p).expand(-1, -1, pt, -1, -1) / pt).reshape(w.shape[0], -1)
        for name in ("final_layer.linear.weight", "final_layer.linear.bias"):  # rows (pt, ph, pw, c): per frame
            if name in state:
                state[name] = state[name].repeat(pt, *([1] * (state[name].ndim - 1)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"the image checkpoint has weights a VideoDiT of this config lacks: {unexpected[:4]}; "
                         f"it is not an MMDiT of the same size (check hidden_size, depth, patch_size, text_dim)")
    bad = [k for k in missing if not k.startswith("temporal_blocks.")]
    if bad:
        raise ValueError(f"the image checkpoint lacks {bad[:4]}: it is not an MMDiT of the same size")
    return missing
