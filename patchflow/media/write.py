"""Writing clips: write_clip (.gif, .mp4, .npz by the suffix) and write_clips_npz, each atomic (a temporary
name in the same folder, renamed into place)."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np

from patchflow.media.formats import WRITE_SUFFIXES, _video_backend
from patchflow.media.frames import _check_frames
from patchflow.media.gif import _write_gif

PIXEL_FORMATS = ("yuv444p", "yuv420p")
CRF = 17  # H.264 constant rate factor: 0 lossless .. 51 worst; 17 is close to visually lossless


@contextmanager
def _atomic(path: Path):
    """Yields a temporary path beside `path` (same suffix, so writers pick the format from it); renames it to
    `path` when the block succeeds, deletes it when it fails."""
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_mp4(tmp: Path, path: Path, frames: np.ndarray, fps: float, pixel_format: str) -> None:
    backend = _video_backend("writing", path)
    if backend == "imageio":
        import imageio.v3 as iio

        iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat=pixel_format,
                    macro_block_size=1, quality=None, ffmpeg_params=["-crf", str(CRF)], ffmpeg_log_level="error")
        return
    import av

    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(10_000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pixel_format
        stream.options = {"crf": str(CRF)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_npz(tmp: Path, arrays: dict) -> None:
    with open(tmp, "xb") as f:
        np.savez_compressed(f, **arrays)


def write_clip(path, frames, fps: float = 8, *, pixel_format: str = "yuv444p") -> Path:
    """Write one clip, uint8 (T, H, W, 3) (or (T, H, W, 1) / (T, H, W) grey), to `path` by its suffix: .gif
    (PIL), .mp4 (H.264 through imageio-ffmpeg or PyAV; `pixel_format` "yuv444p" or "yuv420p", see the module
    docstring) or .npz (`videos` (1, T, H, W, 3)). Atomic; returns the path.

    Raises ValueError for an unknown suffix, bad frames or fps, ImportError for a missing video backend."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"cannot write {path}: unknown suffix {path.suffix!r}; clips are written as "
                         f"{', '.join(WRITE_SUFFIXES)}")
    frames = _check_frames(frames)
    if not (isinstance(fps, (int, float, Fraction)) and np.isfinite(float(fps)) and fps > 0):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    if suffix == ".mp4":
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format must be one of {PIXEL_FORMATS}, got {pixel_format!r}")
        h, w = frames.shape[1:3]
        if pixel_format == "yuv420p" and (h % 2 or w % 2):
            raise ValueError(f"cannot write {path} as yuv420p: it needs an even height and width, the frames are "
                             f"{h}x{w}; use pixel_format='yuv444p' (any size) or crop/pad the frames")
        _video_backend("writing", path)  # before a temporary file exists
    with _atomic(path) as tmp:
        if suffix == ".gif":
            _write_gif(tmp, frames, float(fps))
        elif suffix == ".mp4":
            _write_mp4(tmp, path, frames, float(fps), pixel_format)
        else:
            _write_npz(tmp, {"videos": frames[None]})
    return path


def write_clips_npz(path, videos, prompts=None, **extra) -> Path:
    """Write N clips to an .npz: `videos` uint8 (N, T, H, W, 3) (grey (N, T, H, W, 1) is widened to RGB),
    `prompts` (N,) str when given, and any `extra` arrays under their names (no object arrays). Atomic."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise ValueError(f"cannot write {path}: write_clips_npz writes .npz files")
    a = np.asarray(videos)
    if a.ndim != 5:
        raise ValueError(f"videos must be uint8 (N, T, H, W, 3); got shape {a.shape}")
    arrays = {"videos": _check_frames(a.reshape(-1, *a.shape[2:]), "videos").reshape(*a.shape[:4], 3)}
    if prompts is not None:
        p = np.asarray(prompts)
        if p.ndim != 1 or len(p) != len(a) or not all(isinstance(s, str) for s in p.tolist()):
            raise ValueError(f"prompts must be {len(a)} strings, one per clip; got {p.shape[0] if p.ndim else 0} "
                             f"items of type {p.dtype}")
        arrays["prompts"] = p.astype(str)
    for name, value in extra.items():
        if name in arrays or name == "prompts":
            raise ValueError(f"{name!r} is written by write_clips_npz itself")
        v = np.asarray(value)
        if v.dtype == object:
            raise ValueError(f"extra array {name!r} holds Python objects, which .npz can only store pickled; pass "
                             f"numbers or strings")
        arrays[name] = v
    with _atomic(path) as tmp:
        _write_npz(tmp, arrays)
    return path
