"""`ImageCaptionDataset`: images with captions, listed in a JSON Lines file (for text-to-image models).

One JSON object per line: `{"image": "cats/1.png", "caption": "a cat on a mat"}`; a relative `image` path is
relative to the JSONL file's folder. Blank lines are ignored. A bad entry -- a line that is not a JSON object,
a missing or non-string `image`, a missing, empty (or whitespace-only) or non-string `caption`, an image file
that does not exist or cannot be decoded -- is skipped with one `BadDataWarning` naming the file and line number
(default), or raises ValueError naming them when `strict=True`. Skipping is the default for the same reason
as for image folders: one bad line out of a million should not stop a run; the warnings and `skipped` say
what was left out. Images are converted and resized as in `images.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from patchflow.data.images import load_image
from patchflow.data.skipping import ScannedDataset, SkipLog, describe


class BadEntry(ValueError):
    """A JSONL line that cannot be used; the message says why."""


def parse_entry(line: str, base: Path) -> tuple[Path, str]:
    """One JSONL line -> (image path, caption), or BadEntry."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadEntry(f"not valid JSON ({e})") from None
    if not isinstance(entry, dict):
        raise BadEntry(f"expected a JSON object with keys image and caption, got {type(entry).__name__}")
    image, caption = entry.get("image"), entry.get("caption")
    if not isinstance(image, str) or not image.strip():
        raise BadEntry("missing or empty 'image' (a path string)")
    if caption is None:
        raise BadEntry("missing 'caption'")
    if not isinstance(caption, str):
        raise BadEntry(f"'caption' must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise BadEntry("empty 'caption'")
    path = Path(image).expanduser()
    return (path if path.is_absolute() else base / path), caption


class ImageCaptionDataset(ScannedDataset):
    """Items: x (channels, 1, image_size, image_size) float in [-1, 1], caption str (a batch's is a list of str).

    `skipped` holds ("file.jsonl:LINE", reason) for every entry left out.
    """

    def __init__(self, jsonl_path: str | Path, image_size: int, channels: int = 3, alpha_background: str = "white",
                 strict: bool = False):
        if not str(jsonl_path):
            raise ValueError("the captions file path is empty")
        self.path = Path(jsonl_path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"captions file {str(self.path)!r} does not exist (expected a .jsonl file "
                                    f"with one {{\"image\": ..., \"caption\": ...}} object per line)")
        self.image_size, self.channels, self.alpha_background = image_size, channels, alpha_background
        log = SkipLog()
        self.items: list[tuple[Path, str]] = []
        entries = 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                entries += 1
                where = f"{self.path}:{lineno}"
                try:
                    image, caption = parse_entry(line, self.path.parent)
                    if not image.is_file():
                        raise BadEntry(f"image file {str(image)!r} does not exist")
                    try:
                        load_image(image, image_size, channels, alpha_background, check=True)
                    except Exception as e:  # a corrupt image: the entry is bad like any other
                        raise BadEntry(f"image {str(image)!r} cannot be read ({describe(e)})") from None
                except BadEntry as e:
                    if strict:
                        raise ValueError(f"{where}: {e} (strict=True; the default skips bad lines)") from None
                    log.skip(f"line {lineno} of {self.path}", str(e))
                    continue
                self.items.append((image, caption))
        self.skipped = log.skipped
        if not self.items:
            detail = f" (the first: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped else ""
            raise ValueError(f"{self.path} has no usable image-caption entries: {entries} non-blank lines, "
                             f"{len(self.skipped)} skipped{detail}")
        log.summary(entries, "caption entries")

    def load(self, i: int) -> torch.Tensor:
        x = load_image(self.items[i][0], self.image_size, self.channels, self.alpha_background)
        return x[:, None]  # (C, H, W) -> (C, T=1, H, W)
