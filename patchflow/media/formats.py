"""The clip and image file formats: which suffixes are read and written, and the video backend (imageio-ffmpeg,
else PyAV) that the video suffixes go through."""
from __future__ import annotations

from pathlib import Path

WRITE_SUFFIXES = (".gif", ".mp4", ".npz")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
READ_SUFFIXES = (".gif", *VIDEO_SUFFIXES, ".npz", *IMAGE_SUFFIXES)
VIDEO_INSTALL = 'pip install imageio imageio-ffmpeg (or pip install "patchflow[video]", or pip install av)'


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
