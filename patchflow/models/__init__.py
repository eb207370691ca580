"""Models. `build_model(cfg)` picks the class for `model.arch`."""
from __future__ import annotations

import torch
import torch.nn as nn

TEXT_TOKENS = 16  # prompt length of example inputs (a built-in world's caption is 10-20 MiniLM tokens)


def build_model(cfg) -> nn.Module:
    """The trainable module of a run (RunConfig): a DiT, an MMDiT or CrossDiT (text), a VideoDiT (text-to-video),
    or for a codec run the autoencoder and its losses."""
    if cfg.model.arch == "autoencoder":
        from patchflow.codecs.autoencoder import AutoencoderModel

        return AutoencoderModel(cfg.model)
    if cfg.model.arch == "mmdit":
        from patchflow.models.mmdit import MMDiT

        return MMDiT(cfg.model)
    if cfg.model.arch == "video":
        from patchflow.models.video import VideoDiT

        return VideoDiT(cfg.model)
    if cfg.model.arch == "crossdit":
        from patchflow.models.crossdit import CrossDiT

        return CrossDiT(cfg.model)
    from patchflow.models.dit import DiT

    return DiT(cfg.model)


def example_inputs(cfg, batch: int = 1, device="cpu", random: bool = False) -> tuple[tuple, dict]:
    """(args, kwargs) of one training forward of a diffusion run's model (RunConfig) on `batch` samples: zeros, or
    random values with `random`. Text models get TEXT_TOKENS prompt tokens."""
    m = cfg.model
    make = torch.randn if random else torch.zeros
    x = make(batch, m.in_channels, m.frames, m.input_size, m.input_size, device=device)
    t = torch.rand(batch, device=device) * 1000 if random else torch.zeros(batch, device=device)
    if cfg.is_text_run:
        return (x, t), {"text": make(batch, TEXT_TOKENS, m.text_dim, device=device),
                        "pooled": make(batch, m.pooled_dim, device=device)}
    y = torch.randint(0, m.num_classes, (batch,), device=device) if random else \
        torch.zeros(batch, dtype=torch.long, device=device)
    return (x, t), {"y": y}
