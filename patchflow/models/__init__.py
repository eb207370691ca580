"""Models. `build_model(model_config)` picks the class for `model.arch`."""
from __future__ import annotations

import torch
import torch.nn as nn

TEXT_TOKENS = 16  # prompt length of example inputs (a built-in world's caption is 10-20 MiniLM tokens)


def build_model(config) -> nn.Module:
    """The diffusion transformer of a [model] section: a DiT, an MMDiT or CrossDiT (text), a VideoDiT
    (text-to-video). (A codec run's autoencoder is built by its trainer, patchflow.train.build.)"""
    if config.arch == "mmdit":
        from patchflow.models.mmdit import MMDiT

        return MMDiT(config)
    if config.arch == "video":
        from patchflow.models.video import VideoDiT

        return VideoDiT(config)
    if config.arch == "crossdit":
        from patchflow.models.crossdit import CrossDiT

        return CrossDiT(config)
    if config.arch == "dit":
        from patchflow.models.dit import DiT

        return DiT(config)
    raise ValueError(f"model.arch = {config.arch!r} is not a diffusion transformer (dit, mmdit, crossdit, video)")


def example_inputs(m, batch: int = 1, device="cpu", random: bool = False) -> tuple[tuple, dict]:
    """(args, kwargs) of one training forward of a diffusion model of [model] section `m` on `batch` samples:
    zeros, or random values with `random`. Text models (those with a text_dim) get TEXT_TOKENS prompt tokens."""
    make = torch.randn if random else torch.zeros
    x = make(batch, m.in_channels, m.frames, m.input_size, m.input_size, device=device)
    t = torch.rand(batch, device=device) * 1000 if random else torch.zeros(batch, device=device)
    if hasattr(m, "text_dim"):
        return (x, t), {"text": make(batch, TEXT_TOKENS, m.text_dim, device=device),
                        "pooled": make(batch, m.pooled_dim, device=device)}
    y = torch.randint(0, m.num_classes, (batch,), device=device) if random else \
        torch.zeros(batch, dtype=torch.long, device=device)
    return (x, t), {"y": y}
