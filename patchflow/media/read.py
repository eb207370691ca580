"""Reading clips and stills: read_clip and read_image (PIL formats, video files, .npz), with errors that name
the file and say what is wrong with it."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence

from patchflow.data.images import to_mode
from patchflow.data.skipping import describe
from patchflow.media.formats import READ_SUFFIXES, VIDEO_SUFFIXES, _video_backend
from patchflow.media.frames import _rgb


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
