"""GIF encoding with exact colours: one shared palette when the clip has at most 255 colours, else one per
frame (quantised only where a frame has more); identical consecutive frames kept apart."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from patchflow.media.frames import _check_frames

_GIF_COLORS = 255  # one palette entry stays free, see _gif_frames


def _gif_frames(frames: np.ndarray) -> list[Image.Image]:
    """(T, H, W, 3) uint8 -> palette images whose colours are exact when a clip (or a frame) has <= 255 colours."""
    t = len(frames)
    packed = (frames[..., 0].astype(np.uint32) << 16) | (frames[..., 1].astype(np.uint32) << 8) | frames[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    if len(colours) <= _GIF_COLORS:  # one exact palette for the whole clip
        indices = list(inverse.reshape(packed.shape).astype(np.uint8))
        palettes = [colours] * t
    else:
        indices, palettes = [], []
        for i in range(t):
            c, inv = np.unique(packed[i], return_inverse=True)
            if len(c) <= _GIF_COLORS:
                indices.append(inv.reshape(packed.shape[1:]).astype(np.uint8))
                palettes.append(c)
            else:
                q = Image.fromarray(frames[i]).quantize(_GIF_COLORS, method=Image.Quantize.MEDIANCUT,
                                                        dither=Image.Dither.NONE)
                idx = np.asarray(q, dtype=np.uint8)
                pal = np.asarray(q.getpalette()[:3 * (int(idx.max()) + 1)], dtype=np.uint32).reshape(-1, 3)
                indices.append(idx.copy())
                palettes.append((pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2])
    # PIL's GIF writer merges a frame identical to the previous one into it (a longer delay, one frame fewer).
    # Within a run of equal frames, every other frame shows pixel (0, 0) through a duplicate palette entry of
    # its own colour: the indices differ, so PIL keeps the frame, and the decoded colours are the same.
    i = 0
    while i < t:
        j = i + 1
        while j < t and np.array_equal(frames[j], frames[i]):
            j += 1
        if j - i > 1:
            pal = palettes[i]
            extra = len(pal)  # <= 255, so the duplicate fits in 256 entries
            pal = np.append(pal, pal[indices[i][0, 0]])
            for k in range(i, j):
                palettes[k] = pal
                if (k - i) % 2:
                    indices[k] = indices[k].copy()
                    indices[k][0, 0] = extra
        i = j
    out = []
    for idx, pal in zip(indices, palettes):
        im = Image.fromarray(idx, "P")
        rgb = np.stack([(pal >> 16) & 255, (pal >> 8) & 255, pal & 255], axis=1).astype(np.uint8)
        im.putpalette(rgb.reshape(-1).tobytes(), "RGB")
        out.append(im)
    return out


def _write_gif(tmp, frames: np.ndarray, fps: float) -> None:
    images = _gif_frames(frames)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000 / fps)), optimize=False, disposal=1)


def gif_bytes(frames, fps: float = 8) -> bytes:
    """A clip uint8 (T, H, W, 3) as the bytes of a looping GIF (exact colours, as write_clip's)."""
    buffer = io.BytesIO()
    _write_gif(buffer, _check_frames(frames), fps)
    return buffer.getvalue()
