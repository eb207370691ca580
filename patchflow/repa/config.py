"""The [repa] section: representation alignment of a diffusion model's hidden states with a frozen encoder."""
from __future__ import annotations

from dataclasses import dataclass

from patchflow.checks import ConfigError, positive


@dataclass
class RepaConfig:
    encoder: str = ""                     # "" (off), "world" (patchflow's own encoder of a built-in world, trained
                                          # once into $PATCHFLOW_CACHE), or a directory: a transformers DINOv2 /
                                          # SigLIP / CLIP vision model, or one `patchflow encoder` wrote
    depth: int = 2                        # align the image tokens after this block (1-based; REPA: 8 of DiT-XL's 28)
    weight: float = 0.5                   # lambda of the alignment term beside the diffusion loss (REPA: 0.5)
    projector_dim: int = 512              # hidden width of the 3-layer SiLU projector (REPA: 2048)
    cross_frame: float = 0.0              # clips (CREPA): weight of aligning each frame's tokens with the features of
                                          # its neighbouring frames, beside its own
    cross_frame_window: int = 1           # ... neighbours up to this many token frames away, weighted exp(-distance)
    world_steps: int = 200                # encoder = "world": the world encoder's training steps (its cache key holds
                                          # them)
    cache: str = "auto"                   # encoder features of the clean items: "auto" ($PATCHFLOW_CACHE/features),
                                          # or a directory (`patchflow cache CONFIG --features DIR` builds it)

    @property
    def enabled(self) -> bool:
        return bool(self.encoder.strip())

    def validate(self) -> None:
        positive("repa.depth", self.depth)
        positive("repa.projector_dim", self.projector_dim)
        positive("repa.cross_frame_window", self.cross_frame_window)
        positive("repa.world_steps", self.world_steps)
        for key in ("weight", "cross_frame"):
            if getattr(self, key) < 0:
                raise ConfigError(f"repa.{key} must be >= 0, got {getattr(self, key)}")
        if not self.cache.strip():
            raise ConfigError("repa.cache must not be empty: \"auto\" or a directory")
