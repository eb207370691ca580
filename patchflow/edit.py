"""Edit inputs in the model's units: the mask of what to redraw, read from what a user gives and pooled to latents.

Image-to-image (SDEdit, `strength`) and inpainting (a mask) are one mechanism in the samplers: `init`, the encoded
input, and `keep`, the share of each model value held on the input's own noising path (flow/objective.py). This
module makes `keep` from a mask:

- a mask is an image, white (255) = redraw and black (0) = keep, grey values redrawing partly (an RGB mask is
  read by its mean channel, an alpha channel ignored); one image masks every frame of a clip, a clip of masks
  (T frames, a GIF or an .npz) one mask per frame. A mask of another size than the input is resized (bilinear)
  with a warning; anything that is not an image is refused, naming what was wrong.
- in the model's units a value is redrawn as much as the most-redrawn pixel it covers (the maximum over its
  footprint in space and time, a causal codec's frame 0 on its own), so what the mask asks for is always
  redrawn and every kept latent is exactly the input's: a mask of all black returns the input's codec round trip.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_STRENGTH = 0.7  # image-to-image and video-to-video; a mask redraws its part from noise (strength 1)
MASK_USAGE = "a mask image (white = redraw, black = keep), or a clip of masks (one per frame)"


def default_strength(mask) -> float:
    """The strength of an edit that names none: all of the schedule inside a mask, else DEFAULT_STRENGTH."""
    return 1.0 if mask is not None else DEFAULT_STRENGTH


def read_mask(value, size: tuple[int, int], frames: int = 1, what: str = "mask") -> np.ndarray:
    """A path, PIL image or array -> float32 (T, H, W) in [0, 1] (1 = redraw), T = `frames` (one mask repeated) for
    `size` = (H, W). Arrays: (H, W), (H, W, C) or (T, H, W[, C]); uint8 0..255, bool, or floats in [0, 1]."""
    from patchflow.media.read import read_clip

    if isinstance(value, (str, Path)):
        a = read_clip(value)  # (T, H, W, 3): a still is one frame; names the file when it is not an image
    elif isinstance(value, Image.Image):
        a = np.asarray(value.convert("L"))
    else:
        a = np.asarray(value)
    a = _grey(a, what)
    if a.ndim == 2:
        a = a[None]
    if len(a) not in (1, frames):
        raise ValueError(f"{what}: {len(a)} masks for {frames} frames; give one mask for every frame, or one per "
                         f"frame")
    if a.shape[1:] != tuple(size):
        warnings.warn(f"{what}: resized from {a.shape[1]}x{a.shape[2]} to {size[0]}x{size[1]} (height x width), "
                      f"the input's size", UserWarning, stacklevel=2)
        a = np.stack([np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.Resampling.BILINEAR))
                      for m in a])
    return np.broadcast_to(a, (frames, *size)).astype(np.float32)


def _grey(a: np.ndarray, what: str) -> np.ndarray:
    """An array mask -> float32 (T, H, W) or (H, W) in [0, 1]; ValueError saying what was wrong."""
    if a.size == 0 or not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.number)):
        raise ValueError(f"{what} is not an image ({a.dtype} array of shape {a.shape}); give {MASK_USAGE}")
    dtype = a.dtype
    if (a.ndim == 3 and a.shape[-1] in (3, 4)) or (a.ndim == 4 and a.shape[-1] in (1, 3, 4)):
        a = a[..., :3].astype(np.float32).mean(-1)  # channels last; an alpha channel ignored
    if a.ndim not in (2, 3):
        raise ValueError(f"{what} has shape {a.shape}; give {MASK_USAGE}: (H, W), (H, W, 3) or (T, H, W)")
    a = a.astype(np.float32)
    if dtype == np.uint8:
        return a / 255
    if dtype == np.bool_:
        return a
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"{what}: a float mask holds values in [0, 1] (a uint8 one 0..255); got "
                         f"{a.min()}..{a.max()}")
    return a


def latent_keep(redraw: np.ndarray, latent: tuple[int, int, int], codec=None) -> torch.Tensor:
    """redraw (T, H, W) in [0, 1], pixels -> keep (1, 1, T', h, w) = 1 - the most-redrawn pixel each latent
    (T', h, w) covers; `codec` None for pixel runs (one value per pixel)."""
    t_lat, h, w = latent
    r = torch.from_numpy(np.ascontiguousarray(redraw, dtype=np.float32))
    T, H, W = r.shape
    if H % h or W % w:
        raise ValueError(f"mask of {H}x{W} pixels does not tile the {h}x{w} latent grid")
    r = F.max_pool2d(r[:, None], (H // h, W // w))[:, 0]  # (T, h, w)
    if t_lat != T:
        r = torch.stack([r[frames].amax(0) for frames in _frame_groups(T, t_lat, codec)])
    return (1 - r)[None, None]


def _frame_groups(frames: int, latent_frames: int, codec) -> list[slice]:
    """The pixel frames each latent frame encodes: a causal codec's frame 0 alone, then time_factor at a time."""
    tf = codec.time_factor if codec is not None else 1
    if codec is not None and codec.causal:
        groups = [slice(0, 1)] + [slice(1 + tf * k, 1 + tf * (k + 1)) for k in range(latent_frames - 1)]
    else:
        groups = [slice(tf * k, tf * (k + 1)) for k in range(latent_frames)]
    if groups[-1].stop != frames:
        raise ValueError(f"a mask of {frames} frames does not fit {latent_frames} latent frames")
    return groups
