"""uint8 RGB frame arrays: the checks a clip passes before it is written, colour conversion (grey repeated, alpha
composited over black), and fit_frame (a still fitted to the model's size)."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image


def _rgb(a: np.ndarray) -> np.ndarray:
    """(..., C) uint8 with C in 1, 3, 4 -> (..., 3): grey repeated, alpha composited over black."""
    c = a.shape[-1]
    if c == 3:
        return a
    if c == 1:
        return np.repeat(a, 3, axis=-1)
    alpha = a[..., 3:].astype(np.uint16)
    return ((a[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _check_frames(frames, what: str = "frames") -> np.ndarray:
    """uint8 (T, H, W, 3) from (T, H, W, 3), (T, H, W, 1) or (T, H, W); ValueError otherwise."""
    a = np.asarray(frames)
    expected = f"{what} must be uint8 (T, H, W, 3) RGB, or (T, H, W, 1) / (T, H, W) grey"
    if a.dtype != np.uint8:
        raise ValueError(f"{expected}; got dtype {a.dtype} (convert [-1, 1] floats with "
                         f"((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{expected}; got shape {tuple(np.shape(frames))}")
    if min(a.shape[:3]) < 1:
        raise ValueError(f"{what} must have at least one frame of at least 1x1 pixels; got shape {a.shape}")
    return np.ascontiguousarray(_rgb(a))


def fit_frame(image, size, name: str = "--first-frame") -> np.ndarray:
    """uint8 (H, W, 3) -> (h, w, 3) for `size` = (h, w) (or an int for a square).

    The same size passes unchanged. Another size is centre-cropped to the aspect ratio h:w and resized with
    Lanczos (PIL), with a UserWarning naming `name`, the original and the new size. Grey ((H, W) or (H, W, 1))
    and RGBA ((H, W, 4), composited over black) become RGB with a UserWarning. Anything else -- another dtype,
    2 channels, another number of dimensions -- is a ValueError that says the shape expected."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if not (isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)) and h >= 1 and w >= 1):
        raise ValueError(f"size must be (height, width) of positive integers, got {size!r}")
    a = np.asarray(image)
    expected = (f"{name} must be a uint8 (H, W, 3) RGB image (grey (H, W) / (H, W, 1) and RGBA (H, W, 4) are "
                f"converted)")
    if a.dtype != np.uint8:
        raise ValueError(f"{expected}; got dtype {a.dtype} with shape {a.shape}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{expected}; got shape {np.shape(image)}")
    if min(a.shape[:2]) < 1:
        raise ValueError(f"{name} is empty: shape {np.shape(image)}")
    if a.shape[-1] != 3:
        what = "grey" if a.shape[-1] == 1 else "RGBA (alpha composited over black)"
        warnings.warn(f"{name}: converted from {what} to RGB", UserWarning, stacklevel=2)
        a = _rgb(a)
    H, W = a.shape[:2]
    if (H, W) == (h, w):
        return np.ascontiguousarray(a)
    # the largest centred window with the target aspect ratio, then Lanczos to the target size
    if H * w > W * h:  # too tall
        ch, cw = max(1, round(W * h / w)), W
    else:
        ch, cw = H, max(1, round(H * w / h))
    top, left = (H - ch) // 2, (W - cw) // 2
    img = Image.fromarray(np.ascontiguousarray(a[top:top + ch, left:left + cw]))
    out = np.asarray(img.resize((w, h), Image.Resampling.LANCZOS), dtype=np.uint8).copy()
    crop = f", centre-cropped to {ch}x{cw} first" if (ch, cw) != (H, W) else ""
    warnings.warn(f"{name}: resized from {H}x{W} to {h}x{w} (height x width){crop}", UserWarning, stacklevel=2)
    return out
