"""`VideoFolderDataset`: clips of `frames` frames from GIFs, video files and folders of frame images.

A clip is one of
- a GIF (read with PIL, no ffmpeg needed; frame timings are ignored),
- a video file (.mp4 .avi .mov .mkv .webm) read by `clip_files.read_clip` (imageio-ffmpeg or PyAV:
  `pip install imageio imageio-ffmpeg`, the `video` extra); without one such files are skipped with a warning that
  says what to install,
- a folder of frame images (`clip/*.png|jpg|...`, not .gif), in natural order (frame2 before frame10).

Layout: flat -- clips directly in `root`, label 0 -- when `root` holds a video file or a folder of frames;
otherwise every subfolder of `root` is a class (sorted names -> labels 0..K-1) holding video files and
frame folders.

The first `frames` frames of a clip are used. A clip with fewer frames follows `short_clips`:
"skip" (default: left out, with a warning naming the clip and both counts), "error" (ValueError naming them
when the data set is built) or "loop" (frames repeat from the start: 0, 1, 2, 0, 1, ...). Unreadable clips
are skipped as unreadable images are (`skipping.py`); frames are converted and resized as in `images.py`.

`load_clip` (one clip -> tensor, the short-clip rule) is shared with the captions file's clip lines (`captions.py`).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, ImageSequence

from patchflow.data.folder import check_folder, visible_subfolders
from patchflow.data.images import is_image_file, prepare
from patchflow.data.skipping import BadDataWarning, ScannedDataset, SkipLog, describe

VIDEO_EXTENSIONS = (".gif", ".mp4", ".avi", ".mov", ".mkv", ".webm")
SHORT_CLIPS = ("skip", "error", "loop")


class ShortClip(ValueError):
    """A clip with fewer frames than asked for."""


def natural_key(name: str) -> tuple:
    """'frame10.png' sorts after 'frame2.png': digit runs compare as numbers."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if p.isdigit() else p for p in parts), name


def is_video_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in VIDEO_EXTENSIONS


def is_frame_file(path: Path) -> bool:
    """An image file that can be a frame: GIFs are clips themselves, so a folder of GIFs is a class."""
    return is_image_file(path) and path.suffix.lower() != ".gif" and path.is_file()


def is_frames_folder(path: Path) -> bool:
    return path.is_dir() and any(is_frame_file(p) for p in path.iterdir())


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if is_frame_file(p)), key=lambda p: natural_key(p.name))


def read_frames(clip: Path, limit: int) -> list[Image.Image]:
    """Up to `limit` decoded frames (PIL images, any mode) of a clip, from the start."""
    if clip.is_dir():
        frames = []
        for f in frame_files(clip)[:limit]:
            try:
                with Image.open(f) as im:
                    im.load()
                    frames.append(ImageOps.exif_transpose(im))
            except Exception as e:  # name the bad frame: the clip's own name says little
                raise OSError(f"frame {f.name}: {describe(e)}") from None
        return frames
    if clip.suffix.lower() == ".gif":
        with Image.open(clip) as im:
            frames = []
            for frame in ImageSequence.Iterator(im):
                if len(frames) == limit:
                    break
                frames.append(frame.copy())  # copy: the iterator reuses one image object
            return frames
    from patchflow.clip_files import read_clip

    return [Image.fromarray(a) for a in read_clip(clip, limit=limit)]


def is_clip(path: Path) -> bool:
    """A clip file (VIDEO_EXTENSIONS, any case) or a folder holding frame images."""
    return is_video_file(path) or is_frames_folder(path)


def load_clip(clip: Path, frames: int, image_size: int, channels: int = 3, alpha_background: str = "white",
              short_clips: str = "skip") -> torch.Tensor:
    """A clip (GIF, video file or folder of frames) -> (channels, frames, image_size, image_size) in [-1, 1]: its
    first `frames` frames, each converted and resized as in `images.py`. A clip with fewer frames raises ShortClip
    (no frames at all, or short_clips "skip"/"error": the caller applies the policy) or, with short_clips "loop",
    repeats them from the start (0, 1, .., n-1, 0, 1, ..). Decoder errors propagate (the caller skips the clip)."""
    got = read_frames(clip, frames)
    if not got:
        raise ShortClip("it has no frames")
    if len(got) < frames:
        if short_clips != "loop":
            raise ShortClip(f"it has {len(got)} frames, fewer than the {frames} asked for")
        got = [got[k % len(got)] for k in range(frames)]  # loop: 0, 1, .., n-1, 0, 1, ..
    return torch.stack([prepare(f, image_size, channels, alpha_background) for f in got], dim=1)


def find_clips(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(clip, label)]) of `root` in a fixed order (see the module docstring for the layout)."""
    videos = [p for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name)) if is_video_file(p)]
    subdirs = [root / d for d in visible_subfolders(root)]
    frame_dirs = [d for d in subdirs if is_frames_folder(d)]
    if videos or frame_dirs or not subdirs:
        ignored = [d for d in subdirs if d not in frame_dirs]
        if ignored:
            warnings.warn(f"{len(ignored)} folders in {root} without frame images (e.g. {ignored[0].name}) are "
                          f"ignored: {root} holds clips directly, so it is not a folder of classes",
                          BadDataWarning, stacklevel=3)
        clips = sorted(videos + frame_dirs, key=lambda p: natural_key(p.name))
        return [], [(c, 0) for c in clips]
    classes = [d.name for d in subdirs]
    out = []
    for label, d in enumerate(subdirs):
        clips = [p for p in d.iterdir() if is_video_file(p) or (not p.name.startswith(".") and p.is_dir())]
        out += [(c, label) for c in sorted(clips, key=lambda p: natural_key(p.name))]
    return classes, out


class VideoFolderDataset(ScannedDataset):
    """Items: x (channels, frames, image_size, image_size) float in [-1, 1], label int.

    `classes` are the class folder names (empty for a flat folder), `clips` the good clips in item order,
    `skipped` the (clip, reason) pairs left out (unreadable, or short under short_clips="skip").
    """

    def __init__(self, root: str | Path, frames: int, image_size: int, channels: int = 3,
                 alpha_background: str = "white", short_clips: str = "skip"):
        if short_clips not in SHORT_CLIPS:
            raise ValueError(f"short_clips must be one of {SHORT_CLIPS}, got {short_clips!r}")
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.root = check_folder(root, "video folder")
        self.frames, self.image_size, self.channels = frames, image_size, channels
        self.alpha_background, self.short_clips = alpha_background, short_clips
        self.classes, candidates = find_clips(self.root)
        log = SkipLog()
        self.items: list[tuple[Path, int]] = []
        for clip, label in candidates:
            try:
                self._read(clip)
            except ShortClip as e:
                if short_clips == "error":
                    raise ValueError(f"clip {clip}: {e} (short_clips='error'; 'skip' leaves such clips out, "
                                     f"'loop' repeats their frames)") from None
                log.skip(str(clip), f"{e} (short_clips='skip')")
                continue
            except Exception as e:  # unreadable clip: skip it, keep the rest
                log.skip(str(clip), describe(e))
                continue
            self.items.append((clip, label))
        self.skipped = log.skipped
        if not self.items:
            if not candidates:
                raise ValueError(f"no clips in {self.root}: expected files ending in {', '.join(VIDEO_EXTENSIONS)} or "
                                 f"folders of frame images, directly in it or in one subfolder per class")
            name, reason = self.skipped[0]
            raise ValueError(f"none of the {len(candidates)} clips in {self.root} can be used "
                             f"(the first: {name}: {reason})")
        log.summary(len(candidates), "clips")

    def _read(self, clip: Path) -> torch.Tensor:
        """clip -> (C, frames, H, W); ShortClip when it has fewer frames and the policy is not "loop"."""
        return load_clip(clip, self.frames, self.image_size, self.channels, self.alpha_background, self.short_clips)

    @property
    def num_classes(self) -> int:
        return max(1, len(self.classes))

    @property
    def clips(self) -> list[Path]:
        return [p for p, _ in self.items]

    def load(self, i: int) -> torch.Tensor:
        return self._read(self.items[i][0])
