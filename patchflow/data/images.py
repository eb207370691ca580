"""Decode one image into model units: any PIL mode -> RGB or L -> shorter side resized -> centre crop -> [-1, 1].

Conversion rules (the "Data" section of docs/reliability.md lists them with their tests):

- EXIF orientation is applied first: phone photos store unrotated pixels plus an orientation tag.
- 16-bit grey (`I;16`, `I;16B`, `I;16L`, `I;16N`) and 32-bit `I` are read as 0..65535 and reduced to 8 bit by
  keeping the high byte (v >> 8), so the whole range maps onto 0..255. (PIL's own `convert("L")` clips, turning
  everything above 255 white.) `I` values outside 0..65535 are clipped first.
- Transparency (RGBA, LA, PA, La, RGBa, P with transparency, L/RGB with a tRNS colour) is composited over the
  `background` colour ("white" or "black"): a fully transparent pixel becomes the background, whatever colour
  happens to be stored under alpha 0.
- CMYK, YCbCr, 1-bit and palette images go to RGB through PIL; RGB -> L is ITU-R 601 luma; L -> RGB repeats the
  grey value in all three channels.
- Multi-frame files (GIF, multi-page TIFF, animated WebP) give their first frame here; videos are `video.py`'s.
- Resizing: the shorter side becomes `size` (bicubic; PIL widens the filter when shrinking, i.e. antialiased),
  then the centre `size` x `size` square is cropped. Images smaller than `size` are scaled up the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BACKGROUNDS = {"white": (255, 255, 255, 255), "black": (0, 0, 0, 255)}
CHANNELS = {1: "L", 3: "RGB"}

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension (any case) is one of IMAGE_EXTENSIONS."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) grey -> 8-bit L keeping the high byte: 65535 -> 255, 32768 -> 128, 255 -> 0."""
    a = np.asarray(img)
    a = np.clip(a.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(a.astype(np.uint8), "L")


def to_mode(img: Image.Image, channels: int = 3, background: str = "white") -> Image.Image:
    """Any PIL image -> "RGB" (channels=3) or "L" (channels=1), following the rules in the module docstring."""
    if channels not in CHANNELS:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be 'white' or 'black', got {background!r}")
    if img.mode in _SIXTEEN_BIT:
        img = _to_8bit(img)  # drops a tRNS grey level too: 16-bit keyed transparency is too rare to honour
    elif img.mode in _ALPHA or "transparency" in img.info:
        if img.mode == "La":  # PIL converts premultiplied La only to LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUNDS[background]), rgba)
    target = CHANNELS[channels]
    if img.mode != target:
        # L -> RGB repeats the grey; RGB -> L is luma; other modes pass through RGB so L gets luma too
        img = img.convert(target) if img.mode in ("L", "RGB") else img.convert("RGB").convert(target)
    return img


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> `size` (bicubic, antialiased when shrinking), then the centre size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An "L" or "RGB" PIL image (H, W) -> float (C, H, W) in [-1, 1]: 0 -> -1, 255 -> 1."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def prepare(img: Image.Image, size: int, channels: int = 3, background: str = "white") -> torch.Tensor:
    """A decoded PIL image (any mode, orientation already applied) -> (C, size, size) in [-1, 1]."""
    return to_tensor(resize_center_crop(to_mode(img, channels, background), size))


def load_image(path: str | Path, size: int, channels: int = 3, background: str = "white",
               check: bool = False) -> torch.Tensor:
    """Read one file -> (C, size, size) float in [-1, 1]. Raises (OSError, ValueError, ...) on unreadable files.

    check=True is the up-front scan: PIL's `verify()` first (it checks PNG chunk CRCs, which decoding alone
    skips), and JPEGs decode at reduced scale (`draft`), which still reads every byte, so truncation shows.
    """
    path = Path(path)
    if check:
        with Image.open(path) as im:
            im.verify()
    with Image.open(path) as im:
        if check:
            im.draft(None, (size, size))
        im.load()  # decode now, inside the caller's error guard; a truncated file raises here
        w, h = im.size
        if w < 1 or h < 1:
            raise ValueError(f"image has size {w}x{h}")
        img = ImageOps.exif_transpose(im)
        return prepare(img, size, channels, background)
