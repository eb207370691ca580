"""Reading and writing clips and still images for the CLI and the Python API.

Arrays are uint8 RGB: a clip is (T, H, W, 3), an image (H, W, 3).

Writing (`write_clip`, by the suffix of the path; every write goes to a temporary name in the same folder and is
renamed into place, so a crash never leaves half a file under the real name; missing parent folders are created):

- `.gif` (PIL): loops forever, each frame shown 1000/fps ms (GIF stores centiseconds, so 8 fps is 120 ms).
  Colours are exact whenever the whole clip has at most 255 distinct colours (one shared palette, no dithering),
  as the flat-coloured frames of the built-in worlds do; otherwise each frame with at most 255 colours keeps
  its own exact palette and a frame with more is quantised (median cut, 255 colours, no dithering).
  Identical consecutive frames stay separate frames (PIL would merge them into one longer frame, changing T).
- `.mp4` (H.264): through imageio's ffmpeg plugin (`pip install imageio imageio-ffmpeg`, the `video` extra,
  which bundles an ffmpeg binary), else PyAV (`pip install av`). Without either: ImportError saying what to
  install. The default pixel format is `yuv444p` (crf 17): full colour resolution, any width and height (odd
  ones too), read back at the same size; on 32x32 moving-digits clips the round trip's mean absolute error is
  about 1/255 (tests/test_clip_files.py measures it). `pixel_format="yuv420p"` plays in every player and
  browser (yuv444p H.264 does not play in some, e.g. Safari and Firefox) but halves the colour resolution
  (about 8/255 on the same clips) and needs even sizes. Frames are never rescaled (imageio's macro_block_size
  is 1).
- `.npz`: `videos` uint8 (1, T, H, W, 3); `write_clips_npz` writes N clips with their `prompts`.

Grey input ((T, H, W) or (T, H, W, 1)) is written as RGB with the grey value in all three channels.

Reading (`read_clip`, `read_image`):

- `.gif`, and other PIL formats (.png .jpg .jpeg .webp .bmp .tif .tiff): every frame (a still gives a one-frame
  clip; animated PNG/WebP give all their frames), each the fully composited frame (PIL's iterator handles the
  GIF disposal methods); stills are turned upright by their EXIF orientation.
- `.mp4 .avi .mov .mkv .webm`: imageio's ffmpeg plugin, else PyAV (ImportError naming the install otherwise).
- `.npz`: `videos` (N, T, H, W, C) gives videos[index]; `images` (N, H, W, C) or (N, H, W) a one-frame clip of
  images[index].

Colour conversion on reading: grey becomes RGB (the value repeated), 16-bit grey keeps its high byte, palettes
are expanded, and transparency (RGBA, LA, palette or tRNS transparency, a 4th npz channel) is composited over
**black**: a fully transparent pixel reads as (0, 0, 0), whatever colour is stored under it (`fit_frame` does
the same for an (H, W, 4) array).

Errors: a missing file is FileNotFoundError naming it; an unknown suffix, a corrupt or unreadable file
("<path> is not a GIF patchflow can read: <reason>"), zero frames, an npz without `videos`/`images` (the message
lists the keys it has) or an out-of-range index are ValueError; a missing video backend is ImportError.
"""
from __future__ import annotations

import io
import os
import re
import uuid
import warnings
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence

from patchflow.data.images import to_mode
from patchflow.data.skipping import describe

__all__ = ["write_clip", "write_clips_npz", "read_clip", "read_image", "fit_frame", "WRITE_SUFFIXES",
           "READ_SUFFIXES", "VIDEO_SUFFIXES", "IMAGE_SUFFIXES", "VIDEO_INSTALL"]

WRITE_SUFFIXES = (".gif", ".mp4", ".npz")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
READ_SUFFIXES = (".gif", *VIDEO_SUFFIXES, ".npz", *IMAGE_SUFFIXES)
VIDEO_INSTALL = 'pip install imageio imageio-ffmpeg (or pip install "patchflow[video]", or pip install av)'
PIXEL_FORMATS = ("yuv444p", "yuv420p")
CRF = 17  # H.264 constant rate factor: 0 lossless .. 51 worst; 17 is close to visually lossless

_GIF_COLORS = 255  # one palette entry stays free, see _gif_frames


# ---------------------------------------------------------------------------------------------- helpers


_KINDS = {".gif": "a GIF", ".npz": "an .npz file", ".mp4": "an MP4", ".avi": "an AVI", ".mov": "a MOV",
          ".mkv": "an MKV", ".webm": "a WebM"}
_FFMPEG_PROBLEM = re.compile(r"error|invalid|not found|does not contain|no such|truncated|corrupt|unsupported",
                             re.IGNORECASE)


def _reason(e: BaseException) -> str:
    """What went wrong, on one line; for ffmpeg (imageio) errors the lines of its log that say it, not its banner."""
    text = str(e)
    if "=== stderr ===" in text:
        head, log = text.split("=== stderr ===", 1)
        lines = [re.sub(r"^\[[^\]]*\]\s*", "", line.strip()) for line in log.splitlines()]
        said = list(dict.fromkeys(line for line in lines  # "output" lines are about imageio's pipe, not the file
                                  if _FFMPEG_PROBLEM.search(line) and "output" not in line.lower()))
        text = head.strip() + (f" (ffmpeg: {'; '.join(said[:3])})" if said else "")
        return f"{type(e).__name__}: {' '.join(text.split())}"
    return describe(e)


def _unreadable(path: Path, reason: str | BaseException) -> ValueError:
    text = _reason(reason) if isinstance(reason, BaseException) else reason
    kind = _KINDS.get(path.suffix.lower(), "an image")
    return ValueError(f"{path} is not {kind} patchflow can read: {text}")


def _check_source(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a clip or image file is needed")
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES:
        raise ValueError(f"cannot read {path}: unknown suffix {path.suffix!r}; supported: {' '.join(READ_SUFFIXES)}")
    return path


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


def _video_backend(action: str, path: Path) -> str:
    """'imageio' (imageio.v3 + imageio-ffmpeg) or 'av' (PyAV); ImportError saying what to install otherwise."""
    try:
        import imageio.v3  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
        return "imageio"
    except ImportError:
        pass
    try:
        import av  # noqa: F401
        return "av"
    except ImportError:
        pass
    raise ImportError(f"{action} {path.suffix} video ({path}) needs imageio with its ffmpeg plugin or PyAV, and "
                      f"neither is installed: {VIDEO_INSTALL}")


# ---------------------------------------------------------------------------------------------- writing


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


# ---------------------------------------------------------------------------------------------- reading


class _NotReadable(Exception):
    """A file of the right suffix whose content is something else; the message says what."""


class _WrongContent(Exception):
    """A readable file without what was asked for (npz keys, an index out of range); the message says what."""


def _read_pil(path: Path, limit: int | None) -> list[np.ndarray]:
    frames = []
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            if limit is not None and len(frames) == limit:
                break
            frame.load()  # decode now, inside the caller's error guard
            if getattr(im, "n_frames", 1) == 1:
                frame = ImageOps.exif_transpose(frame)
            frames.append(np.asarray(to_mode(frame.copy(), 3, "black"), dtype=np.uint8).copy())
    return frames


def _read_video(path: Path, limit: int | None) -> list[np.ndarray]:
    frames = []
    if _video_backend("reading", path) == "imageio":
        import imageio.v3 as iio

        for f in iio.imiter(path, plugin="FFMPEG"):
            if limit is not None and len(frames) == limit:
                break
            frames.append(np.asarray(f, dtype=np.uint8))
        return frames
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _NotReadable("it has no video stream")
        for f in container.decode(video=0):
            if limit is not None and len(frames) == limit:
                break
            frames.append(f.to_ndarray(format="rgb24"))
    return frames


def _npz_array(path: Path, index: int, frames: bool) -> np.ndarray:
    """videos[index] (T, H, W, 3), or images[index] as a one-frame clip; frames=False: just the first frame."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head[:2] != b"PK":
        what = "a single .npy array" if head == b"\x93NUMPY" else "not a zip archive"
        raise _NotReadable(f"it is {what}; an .npz (np.savez) of named arrays is needed")
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.files)
        if "videos" in keys:
            key, rank, layout = "videos", 5, "(N, T, H, W, 3)"
        elif "images" in keys:
            key, rank, layout = "images", 4, "(N, H, W, 3)"
        else:
            raise _WrongContent(f"it has no 'videos' (N, T, H, W, 3) or 'images' (N, H, W, 3) array; its keys: "
                           f"{', '.join(keys) or 'none'}")
        a = f[key]
    if key == "images" and a.ndim == 3:
        a = a[..., None]
    if a.ndim != rank or a.shape[-1] not in (1, 3, 4) or a.dtype != np.uint8:
        raise _WrongContent(f"'{key}' must be uint8 {layout}; it is {a.dtype} {a.shape}")
    if not 0 <= index < len(a):
        raise _WrongContent(f"index {index} is out of range: it holds {len(a)} {key[:-1]}s (0..{len(a) - 1})")
    clip = a[index] if key == "videos" else a[index][None]
    if not frames:
        clip = clip[:1]
    return _rgb(clip)


def _read(path, index: int, limit: int | None) -> np.ndarray:
    path = _check_source(path)
    suffix = path.suffix.lower()
    if index != 0 and suffix != ".npz":
        raise ValueError(f"index={index}: {path} holds one clip; index picks a clip in an .npz file")
    try:
        if suffix == ".npz":
            clip = _npz_array(path, index, limit is None)
        elif suffix in VIDEO_SUFFIXES:
            clip = _read_video(path, limit)
        else:
            clip = _read_pil(path, limit)
    except (FileNotFoundError, ImportError):
        raise
    except _NotReadable as e:
        raise _unreadable(path, str(e)) from None
    except _WrongContent as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:
        raise _unreadable(path, e) from None
    if len(clip) == 0:
        raise ValueError(f"{path} has no frames")
    clip = np.stack(clip) if isinstance(clip, list) else clip
    if clip.ndim != 4 or clip.shape[-1] != 3 or min(clip.shape[1:3]) < 1:
        raise _unreadable(path, f"decoded to an array of shape {clip.shape}")
    return np.ascontiguousarray(clip, dtype=np.uint8)


def read_clip(path, index: int = 0, limit: int | None = None) -> np.ndarray:
    """A clip file -> uint8 (T, H, W, 3), T >= 1: a GIF, a video file, clip `index` of an .npz (`videos`, or
    `images` as one-frame clips) or a still image (one frame); at most `limit` frames (GIFs and video files stop
    decoding there). See the module docstring for conversions and errors (FileNotFoundError, ValueError naming the
    file, ImportError for a missing video backend)."""
    clip = _read(path, index, limit)
    return clip if limit is None else clip[:limit]


def read_image(path, index: int = 0) -> np.ndarray:
    """A still -> uint8 (H, W, 3): an image file, the first frame of a GIF or video, or the first frame of
    item `index` of an .npz (`images` or `videos`). RGB; alpha composited over black (module docstring)."""
    return _read(path, index, 1)[0]


# ---------------------------------------------------------------------------------------------- fitting


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
