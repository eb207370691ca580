"""The configs of the text-conditioned models: `MMDiT` (SD3's joint attention, model.arch = "mmdit") and
`CrossDiT` (PixArt-style cross-attention, model.arch = "crossdit"), which share every size field so the two can be
compared at the same budget, and `VideoDiT` (model.arch = "video"), MMDiT's fields plus time."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TEXT_ARCHS = ("mmdit", "crossdit", "video")


@dataclass
class MMDiTConfig:
    arch: str = "mmdit"               # "mmdit" (joint attention, SD3), "crossdit" (cross-attention, PixArt-alpha);
                                      # "video" is VideoDiTConfig
    input_size: int = 32              # latent height = width of training (the default sampling size)
    frames: int = 1                   # latent frames T; 1 for images
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 384               # width of the text encoder's token features (MiniLM: 384)
    pooled_dim: int = 384             # width of its pooled vector (MiniLM: 384)
    qk_norm: bool = True              # RMSNorm on queries and keys per head (SD3.5)
    dual_attention_layers: list[int] = field(default_factory=list)  # mmdit: blocks with extra image-only attention
    pos_embed_max_size: int = 0       # side of the positional table in patches, centre-cropped per input;
                                      # 0 = 2 * input_size / patch_size

    learn_sigma = False  # flows predict no variance (class attribute, not a config key)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def grid(self) -> int:
        """Patches per side at the training size."""
        return self.input_size // self.patch_size

    @property
    def pos_table_size(self) -> int:
        return self.pos_embed_max_size or 2 * self.grid

    def validate(self) -> None:
        """Raise ValueError naming the field when the shapes cannot work."""
        if self.arch not in TEXT_ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(map(repr, TEXT_ARCHS))} for a text model, "
                             f"got {self.arch!r}")
        most = {"input_size": 8192, "frames": 4096, "in_channels": 1024, "patch_size": 64, "hidden_size": 16384,
                "depth": 1024, "num_heads": 1024, "text_dim": 65536, "pooled_dim": 65536}
        for name, limit in most.items():
            if not 1 <= getattr(self, name) <= limit:
                raise ValueError(f"model.{name} must be in 1..{limit}, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"model.patch_size={self.patch_size} does not divide model.input_size={self.input_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos positions)")
        if not 0 < self.mlp_ratio <= 64:
            raise ValueError(f"model.mlp_ratio must be in (0, 64], got {self.mlp_ratio}")
        if not 0 <= self.pos_embed_max_size <= 4096:
            raise ValueError(f"model.pos_embed_max_size must be in 0..4096 (0 = twice the training grid), "
                             f"got {self.pos_embed_max_size}")
        if self.pos_table_size < self.grid:
            raise ValueError(f"model.pos_embed_max_size={self.pos_embed_max_size} is smaller than the training grid "
                             f"of {self.grid} patches per side; use >= {self.grid} (or 0 for twice the grid)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"model.dual_attention_layers has block index {bad[0]} outside 0..{self.depth - 1}")
        if self.dual_attention_layers and self.arch != "mmdit":
            raise ValueError("model.dual_attention_layers is an MMDiT option (SD3.5 dual attention); "
                             f"model.arch = {self.arch!r} has no joint attention: leave it out")


@dataclass
class VideoDiTConfig(MMDiTConfig):
    """`VideoDiT` (model.arch = "video"): MMDiT's joint text-image blocks over spacetime patches. The size fields are
    MMDiT's; `input_size` and `frames` are the latent training size (the default sampling size)."""

    arch: str = "video"
    frames: int = 8                   # latent frames T of training clips (images are T = 1)
    temporal_patch: int = 1           # tubelet depth pt: latent frames per token (the patch is pt x p x p)
    attention: str = "full"           # "full" (joint attention over every frame) or "factorized" (joint attention
                                      # within each frame, then attention along time per place: Latte/Open-Sora 1.x)
    positions: str = "sincos"         # "sincos" (2D table + temporal codes, zero at frame 0) or "rope" (3D RoPE)

    def validate(self) -> None:
        if self.arch != "video":
            raise ValueError(f"VideoDiTConfig is for model.arch = 'video', got {self.arch!r}")
        MMDiTConfig.validate(dataclasses.replace(self, arch="mmdit"))
        if not 1 <= self.temporal_patch <= 64:
            raise ValueError(f"model.temporal_patch must be in 1..64, got {self.temporal_patch}")
        if self.frames % self.temporal_patch:
            raise ValueError(f"model.temporal_patch={self.temporal_patch} does not divide model.frames={self.frames}")
        for name, allowed in (("attention", ("full", "factorized")), ("positions", ("sincos", "rope"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.positions == "rope" and self.hidden_size // self.num_heads < 8:
            raise ValueError(f"model.positions = 'rope' needs at least 8 features per head, got "
                             f"{self.hidden_size // self.num_heads}; use fewer heads")
        if self.dual_attention_layers:
            raise ValueError("model.dual_attention_layers is an image MMDiT option; a video model has none")
