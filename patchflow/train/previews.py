"""Preview grids while training: samples from the EMA weights (one column per class), a codec run's
reconstructions, with cfg.sample's settings, in RUN/samples/step_N.png (clips: .gif)."""
from __future__ import annotations

from pathlib import Path

from patchflow.lora.adapters import merge
from patchflow.media.grids import save_grid
from patchflow.previews import preview
from patchflow.train.build import build_trainable


class Previews:
    def __init__(self, cfg, out: Path, device, codec, conditioning, base=None):
        """base: () -> a LoRA run's frozen base weights, which the EMA of its adapters is merged into."""
        self.cfg, self.out, self.device, self.codec, self.conditioning = cfg, out, device, codec, conditioning
        self.base = base
        self.model = None  # a plain copy of the model for the EMA weights, built on first use

    def write(self, ema, step: int, main: bool) -> Path | None:
        """The grid at `step`; the main process draws it (the EMA's state_dict is a collective when sharded)."""
        ema_sd = ema.state_dict(keep=main)
        if not main:
            return None
        if self.model is None:
            self.model = build_trainable(self.cfg).to(self.device).eval().requires_grad_(False)
        if self.base is not None:
            ema_sd = merge(self.base(), [(ema_sd, self.cfg.lora.scale)])
        self.model.load_state_dict(ema_sd)
        images, nrow = preview(self.model, self.cfg, self.codec, device=self.device, conditioning=self.conditioning)
        path = self.out / "samples" / f"step_{step:07d}{'.gif' if images.ndim == 5 else '.png'}"
        path.parent.mkdir(exist_ok=True)
        save_grid(images, path, nrow=nrow)
        return path
