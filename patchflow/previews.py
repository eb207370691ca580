"""What a run shows while it trains (sample grids, the studio's example prompt): samples of fixed held-out
prompts or classes, or a codec run's reconstructions."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn

from patchflow.config import RunConfig
from patchflow.pipeline import generate, to_uint8


def preview_prompts(cfg: RunConfig, n: int = 30) -> list[str]:
    """Fixed prompts a text run shows while it trains: the canonical captions of the first held-out items of a
    built-in world, else the first training captions."""
    from patchflow.data import build_dataset, item_text

    try:
        data = build_dataset(dataclasses.replace(cfg.data, paraphrases=False), "val", text=True)
    except ValueError:  # caption files have no validation split
        data = build_dataset(cfg.data, "train", text=True)
    return [item_text(data, i) for i in range(min(n, len(data)))]


@torch.inference_mode()
def preview(model: nn.Module, cfg: RunConfig, codec=None, device: torch.device | None = None,
            conditioning=None) -> tuple[np.ndarray, int]:
    """What a run shows while it trains: (uint8 (N, H, W, C) images, images per row); a video run: clips
    (N, T, H, W, C) of 16 held-out prompts, 4 per row.

    A class run: samples, one column per class (decoded by `codec` in a latent run). A text run: samples of fixed
    held-out prompts (`preview_prompts`). A codec run: held-out items (rows of originals) above their
    reconstructions; clips show one frame per column.
    """
    if cfg.kind.prompts:
        video = cfg.kind.video
        x = generate(model, cfg, preview_prompts(cfg, 16 if video else 30), conditioning=conditioning, device=device,
                     codec=codec)
        return (to_uint8(x), 4) if video else (to_uint8(x)[:, 0], 10)
    if cfg.kind.labels:
        m = cfg.model
        rows = max(1, min(10, 100 // m.num_classes))
        x = generate(model, cfg, torch.arange(m.num_classes).repeat(rows), conditioning=conditioning, device=device,
                     codec=codec)
        return to_uint8(x)[:, 0], m.num_classes
    from patchflow.data import build_dataset

    try:
        data = build_dataset(cfg.data, "val")
    except ValueError:  # folders have no validation split
        data = build_dataset(cfg.data, "train")
    frames = data[0][0].shape[1]
    n = min(len(data), 10 if frames == 1 else 4)
    x = torch.stack([data[int(i)][0] for i in np.linspace(0, len(data) - 1, n)]).to(device or "cpu")  # spread out
    recon = model.codec.decode(model.codec.encode(x))
    if frames == 1:  # a row of originals, a row of reconstructions
        return to_uint8(torch.cat([x, recon]))[:, 0], n
    pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # clip 0, its reconstruction, clip 1, ...
    images = to_uint8(pairs)  # (2n, T, H, W, C)
    return images.reshape(-1, *images.shape[2:]), frames
