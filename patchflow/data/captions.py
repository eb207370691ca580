"""`ImageCaptionDataset`: images and clips with captions, listed in a JSON Lines file (text-to-image and
text-to-video models).

One JSON object per line, naming an image or a clip:

    {"image": "cats/1.png", "caption": "a cat on a mat"}
    {"video": "clips/ball.mp4", "caption": "a red ball rolling left"}

A relative path is relative to the JSONL file's folder. `image` is read as in `images.py` (a GIF gives its first
frame). `video` is a clip as in `video.py`: a GIF, a video file (.mp4 .avi .mov .mkv .webm; needs imageio-ffmpeg
or PyAV, `pip install "patchflow[video]"`) or a folder of frame images (natural order), read by the same code as
`VideoFolderDataset` (`video.load_clip`). Images and clips may be mixed in one file.

Items are (x, caption): an image line gives x (channels, 1, H, W), a clip line x (channels, frames, H, W), its
first `frames` frames (data.frames in a run; the default frames=1 keeps only a clip's first frame). So a file that
mixes images and clips, with frames > 1, has items of two sizes: images stay one-frame items (an image is a
one-frame clip, as `data.mix_images` adds them to the moving-digits world), which a run can only batch with
`data.buckets` holding a one-frame bucket (or `train.pack_tokens`); the trainer refuses a run whose items do not
all have the model's frames otherwise, naming the lines (`data.check_dense_frames`). `item_frames` lists every
item's frame count without loading anything.

A clip with fewer than `frames` frames follows `short_clips` as in `video.py`: "skip" (default: left out with a
`BadDataWarning` naming the file, line and both counts), "error" (ValueError naming them, when the data set is
built) or "loop" (its frames repeat from the start). `strict` does not change this policy.

Blank lines are ignored. A bad entry -- a line that is not a JSON object, neither or both of `image` and `video`,
a path that is not a non-empty string, a missing, empty (or whitespace-only) or non-string `caption`, a file that
does not exist, an image that cannot be decoded, a `video` that is not a clip (a file of another suffix, a folder
without frame images) or cannot be decoded -- is skipped with one `BadDataWarning` naming the file and line number
(default), or raises ValueError naming them when `strict=True`. Skipping is the default for the same reason as for
image folders: one bad line out of a million should not stop a run; the warnings and `skipped` say what was left
out. Every image and clip is decoded once when the data set is built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from patchflow.data.images import load_image
from patchflow.data.skipping import ScannedDataset, SkipLog, describe
from patchflow.data.video import SHORT_CLIPS, VIDEO_EXTENSIONS, ShortClip, is_clip, load_clip

KINDS = ("image", "video")


class BadEntry(ValueError):
    """A JSONL line that cannot be used; the message says why."""


class Entry(NamedTuple):
    """One usable line: items[i][0] is the file, items[i][1] the caption (what `data.item_text` reads)."""

    path: Path
    caption: str
    kind: str  # "image" or "video"
    line: int  # line number in the JSONL file, for messages


def parse_entry(line: str, base: Path) -> tuple[Path, str, str]:
    """One JSONL line -> (image or clip path, caption, "image" or "video"), or BadEntry."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadEntry(f"not valid JSON ({e})") from None
    if not isinstance(entry, dict):
        raise BadEntry(f"expected a JSON object with keys image (or video) and caption, got {type(entry).__name__}")
    given = [k for k in KINDS if k in entry]
    if len(given) == 2:
        raise BadEntry("both 'image' and 'video' given; a line names one image or one clip")
    if not given:
        raise BadEntry("missing 'image' or 'video' (a path string)")
    kind = given[0]
    source, caption = entry[kind], entry.get("caption")
    if not isinstance(source, str) or not source.strip():
        raise BadEntry(f"missing or empty '{kind}' (a path string)")
    if caption is None:
        raise BadEntry("missing 'caption'")
    if not isinstance(caption, str):
        raise BadEntry(f"'caption' must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise BadEntry("empty 'caption'")
    path = Path(source).expanduser()
    return (path if path.is_absolute() else base / path), caption, kind


class ImageCaptionDataset(ScannedDataset):
    """Items: x (channels, T, image_size, image_size) float in [-1, 1] -- T = 1 for an image line, `frames` for a
    clip line -- and caption str (a batch's is a list of str).

    `items` holds an `Entry` (path, caption, kind, line) per usable line, `item_frames` each item's T, `skipped`
    ("line N of file.jsonl", reason) for every entry left out.
    """

    def __init__(self, jsonl_path: str | Path, image_size: int, channels: int = 3, alpha_background: str = "white",
                 strict: bool = False, frames: int = 1, short_clips: str = "skip"):
        if not str(jsonl_path):
            raise ValueError("the captions file path is empty")
        if short_clips not in SHORT_CLIPS:
            raise ValueError(f"short_clips must be one of {SHORT_CLIPS}, got {short_clips!r}")
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.path = Path(jsonl_path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"captions file {str(self.path)!r} does not exist (expected a .jsonl file "
                                    f"with one {{\"image\": ..., \"caption\": ...}} or {{\"video\": ..., "
                                    f"\"caption\": ...}} object per line)")
        self.image_size, self.channels, self.alpha_background = image_size, channels, alpha_background
        self.frames, self.short_clips = frames, short_clips
        log = SkipLog()
        self.items: list[Entry] = []
        entries = 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                entries += 1
                where = f"{self.path}:{lineno}"
                try:
                    path, caption, kind = parse_entry(line, self.path.parent)
                    self._check(path, kind)
                except ShortClip as e:
                    if short_clips == "error":
                        raise ValueError(f"{where}: clip {str(path)!r}: {e} (short_clips='error'; 'skip' leaves "
                                         f"such clips out, 'loop' repeats their frames)") from None
                    log.skip(f"line {lineno} of {self.path}", f"clip {str(path)!r}: {e} (short_clips='skip')")
                    continue
                except BadEntry as e:
                    if strict:
                        raise ValueError(f"{where}: {e} (strict=True; the default skips bad lines)") from None
                    log.skip(f"line {lineno} of {self.path}", str(e))
                    continue
                self.items.append(Entry(path, caption, kind, lineno))
        self.skipped = log.skipped
        if not self.items:
            detail = f" (the first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise ValueError(f"{self.path} has no usable image-caption entries: {entries} non-blank lines, "
                             f"{len(self.skipped)} skipped{detail}")
        log.summary(entries, "caption entries")

    def _check(self, path: Path, kind: str) -> None:
        """Decode an entry's file once: BadEntry when it is missing or unreadable, ShortClip for a short clip."""
        if kind == "image":
            if not path.is_file():
                raise BadEntry(f"image file {str(path)!r} does not exist")
            try:
                load_image(path, self.image_size, self.channels, self.alpha_background, check=True)
            except Exception as e:  # a corrupt image: the entry is bad like any other
                raise BadEntry(f"image {str(path)!r} cannot be read ({describe(e)})") from None
            return
        if not path.exists():
            raise BadEntry(f"clip {str(path)!r} does not exist")
        if not is_clip(path):
            raise BadEntry(f"'video' {str(path)!r} is not a clip: expected a file ending in "
                           f"{', '.join(VIDEO_EXTENSIONS)} or a folder of frame images (a still image is an "
                           f"'image' line)")
        try:
            load_clip(path, self.frames, self.image_size, self.channels, self.alpha_background, self.short_clips)
        except ShortClip:
            raise
        except Exception as e:  # unreadable clip (or a missing video backend, which the reason names)
            raise BadEntry(f"clip {str(path)!r} cannot be read ({describe(e)})") from None

    @property
    def item_frames(self) -> list[int]:
        """Each item's frame count T: 1 for an image line, `frames` for a clip line (nothing is loaded)."""
        return [1 if e.kind == "image" else self.frames for e in self.items]

    def stands_in(self, i: int, j: int) -> bool:
        """A file gone bad after the scan is replaced by a readable item of its kind (image or clip), so the
        substitute has its frames and a batch of one size stays one size."""
        return self.items[i].kind == self.items[j].kind

    def load(self, i: int) -> torch.Tensor:
        e = self.items[i]
        if e.kind == "image":
            x = load_image(e.path, self.image_size, self.channels, self.alpha_background)
            return x[:, None]  # (C, H, W) -> (C, T=1, H, W)
        return load_clip(e.path, self.frames, self.image_size, self.channels, self.alpha_background, self.short_clips)
