"""Several samples tiled into one picture (grid) or one animated clip of tiles (save_grid): the output of
`patchflow sample`, the demos and the trainer's sample grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from patchflow.media.write import write_clip


def grid(images: np.ndarray, nrow: int = 10, pad: int = 2) -> np.ndarray:
    """images: uint8 (N, H, W, C) -> one (rows, cols, C) picture, `nrow` images per row."""
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    return out


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 10, pad: int = 2) -> None:
    """images: uint8 (N, H, W, C) -> one PNG grid, `nrow` images per row; clips (N, T, H, W, C) -> an animated grid
    (GIF or MP4 by the suffix)."""
    if images.ndim == 5:
        write_clip(path, np.stack([grid(images[:, t], nrow, pad) for t in range(images.shape[1])]))
        return
    g = grid(images, nrow, pad)
    Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(path)
