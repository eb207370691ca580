"""Scores of edits on the color-digits world: recolouring real held-out images by prompt, and inpainting a digit
into a real image whose digit is masked out. Both read samples with `prompts.score` (the prompt's attributes).

- recolour: each held-out single-digit image, re-prompted with its caption but another digit colour (one the
  world draws on that background), edited at `strength`: the share with the new colour, and with the original
  digit (and background and position) kept; `shape_kept`, the mean intersection over union of the input's and the
  edit's ink (weight > 0.5, as the checker sees it), says how much of the drawing itself survives.
- inpaint: each held-out single-digit image with its digit's ink box (grown by `margin` px) masked out and
  redrawn from a prompt asking for another digit in the same colours and place: the share that shows the asked
  digit, and the mean absolute difference (0..255) of the pixels outside the mask from the input's codec round
  trip (pixels at once for pixel runs).
"""
from __future__ import annotations

import numpy as np
import torch

from patchflow.data.color_digits import ColorDigitsDataset, canonical_caption
from patchflow.data.worlds import COLOR_NAMES, legible
from patchflow.evaluate.prompts import ink_weights, score
from patchflow.pipeline import to_uint8

__all__ = ["held_out_digits", "recolour", "inpaint", "round_trip"]


def held_out_digits(n: int, seed: int = 0, world_seed: int = 0) -> tuple[ColorDigitsDataset, list[int]]:
    """n single-digit items of the validation split (held-out MNIST digits), in an order drawn from `seed`."""
    data = ColorDigitsDataset("val", seed=world_seed)
    order = np.random.default_rng(seed).permutation(len(data)).tolist()
    items = [i for i in order if data.attributes(i)["kind"] == "digit"][:n]
    if len(items) < n:
        raise ValueError(f"n must be at most {len(items)} (the single-digit validation items), got {n}")
    return data, items


def round_trip(pipe, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) through the run's codec and back (unchanged for pixel runs)."""
    if pipe.codec is None:
        return images
    with torch.no_grad():
        return to_uint8(pipe.codec.decode(pipe._encode(images[:, None])))[:, 0]


def recolour(pipe, n: int = 200, seed: int = 0, strength: float | None = None, **sampling) -> dict:
    """Rates of edits that ask each held-out image for another digit colour (module docstring)."""
    data, items = held_out_digits(n, seed, pipe.cfg.data.seed)
    rng = np.random.default_rng(seed + 1)
    images, prompts = [], []
    for i in items:
        a = data.attributes(i)
        colors = [c for c in COLOR_NAMES if c != a["color"] and legible(c, a["background"])]
        new = colors[rng.integers(len(colors))]
        images.append(data.render(i)[0])
        prompts.append(canonical_caption({**a, "color": new}))
    images = np.stack(images)
    out = np.concatenate([pipe(prompt=prompts[k:k + 50], init_image=images[k:k + 50], strength=strength,
                               seed=seed, **sampling) for k in range(0, n, 50)])
    report = score(out, prompts)
    return {"n": n, "strength": strength, "rates": dict(report.rates), "shape_kept": ink_iou(images, out),
            "samples": out, "inputs": images, "prompts": prompts}


def ink_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Mean intersection over union of the ink (weight > 0.5) of image pairs a[k], b[k] (uint8 (N, H, W, 3))."""
    ious = []
    for x, y in zip(a, b):
        u, v = ink_weights(x)[2] > 0.5, ink_weights(y)[2] > 0.5
        ious.append((u & v).sum() / max((u | v).sum(), 1))
    return float(np.mean(ious))


def inpaint(pipe, n: int = 200, seed: int = 0, margin: int = 2, **sampling) -> dict:
    """Rates of inpainting another digit where each held-out image's digit was (module docstring)."""
    data, items = held_out_digits(n, seed, pipe.cfg.data.seed)
    rng = np.random.default_rng(seed + 2)
    images, masks, prompts = [], [], []
    for i in items:
        a = data.attributes(i)
        rgb, alpha = data.render(i)
        ys, xs = np.nonzero(alpha > 0)
        mask = np.zeros(alpha.shape, np.uint8)
        mask[max(0, ys.min() - margin):ys.max() + margin + 1, max(0, xs.min() - margin):xs.max() + margin + 1] = 255
        new = int((a["digit"] + 1 + rng.integers(9)) % 10)  # any other digit
        images.append(rgb)
        masks.append(mask)
        prompts.append(canonical_caption({**a, "digit": new}))
    images, masks = np.stack(images), np.stack(masks)
    out = np.concatenate([pipe(prompt=prompts[k:k + 50], init_image=images[k:k + 50], mask=list(masks[k:k + 50]),
                               seed=seed, **sampling) for k in range(0, n, 50)])
    outside = np.broadcast_to((masks == 0)[..., None], out.shape)
    err = np.abs(out.astype(np.float64) - round_trip(pipe, images))[outside].mean()
    report = score(out, prompts)
    return {"n": n, "margin": margin, "rates": dict(report.rates), "outside_error": float(err),
            "masked_share": float((masks > 0).mean()), "samples": out, "inputs": images, "masks": masks,
            "prompts": prompts}
