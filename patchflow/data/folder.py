"""`ImageFolderDataset`: a user's folder of images, with or without one subfolder per class.

Layouts (as torchvision's ImageFolder):

- class subfolders `root/<class_name>/**/*.png|jpg|jpeg|webp|bmp|gif|tif|tiff` (any case): classes sorted by
  folder name get labels 0..K-1; images lying directly in `root` beside class folders are ignored (warned);
- a flat folder `root/*.png ...`: every image has label 0 (one class, i.e. unconditional with dropout).

Hidden files and folders (".DS_Store", ".ipynb_checkpoints") are ignored. Every image is decoded once when the
data set is built; unreadable ones (corrupt, truncated, empty, not an image) are skipped, each with one
`BadDataWarning` naming it, and a closing "skipped N of M images (see warnings)". Conversion and resizing are
`images.py`'s.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from patchflow.data.images import IMAGE_EXTENSIONS, is_image_file, load_image
from patchflow.data.skipping import BadDataWarning, ScannedDataset, SkipLog, describe


def check_folder(root: str | Path, what: str = "image folder") -> Path:
    """The folder as a Path, or a FileNotFoundError / NotADirectoryError naming it."""
    if not str(root):
        raise ValueError(f"the {what} path is empty")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is not a folder")
    return path


def visible_subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden subfolders, sorted (symlinked folders count)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Visible image files in `folder` (and, if recursive, below it), sorted by path relative to it.

    Symlinked subfolders below `folder` are not followed (no loops); `folder` itself may be a link.
    """
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if is_image_file(f)]
    return sorted(out, key=lambda p: p.relative_to(folder).parts)


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of `root` in a fixed order: by class, then by relative path."""
    classes = visible_subfolders(root)
    if not classes:
        return [], [(p, 0) for p in image_files(root, recursive=False)]
    loose = image_files(root, recursive=False)
    if loose:
        warnings.warn(f"{len(loose)} image files directly in {root} (e.g. {loose[0].name}) are ignored: with "
                      f"class subfolders every image must be inside one", BadDataWarning, stacklevel=3)
    return classes, [(p, label) for label, c in enumerate(classes) for p in image_files(root / c)]


def no_images_message(root: Path, found: int, skipped: list[tuple[str, str]]) -> str:
    exts = ", ".join(IMAGE_EXTENSIONS)
    if found == 0:
        return (f"no images in {root}: expected files ending in {exts} (any case), directly in it or in one "
                f"subfolder per class")
    name, reason = skipped[0]
    return f"none of the {found} images in {root} could be read (the first: {name}: {reason}); accepted: {exts}"


class ImageFolderDataset(ScannedDataset):
    """Items: x (channels, 1, image_size, image_size) float in [-1, 1] (an image is a one-frame video), label int.

    `classes` are the class folder names (label = position; empty for a flat folder), `num_classes` is
    max(1, len(classes)), `files` the good files in item order, `skipped` the (file, reason) pairs left out.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, alpha_background: str = "white"):
        self.root = check_folder(root)
        self.image_size, self.channels, self.alpha_background = image_size, channels, alpha_background
        self.classes, candidates = find_images(self.root)
        log = SkipLog()
        self.items: list[tuple[Path, int]] = []
        for path, label in candidates:
            try:
                load_image(path, image_size, channels, alpha_background, check=True)
            except Exception as e:  # whatever a corrupt file makes a decoder raise: skip it, keep the rest
                log.skip(str(path), describe(e))
                continue
            self.items.append((path, label))
        self.skipped = log.skipped
        if not self.items:
            raise ValueError(no_images_message(self.root, len(candidates), self.skipped))
        log.summary(len(candidates), "images")
        kept = {label for _, label in self.items}
        for label, c in enumerate(self.classes):
            if label not in kept:  # the label stays reserved: labels are the positions of the sorted names
                warnings.warn(f"class folder {self.root / c} (label {label}) has no readable images",
                              BadDataWarning, stacklevel=2)

    @property
    def num_classes(self) -> int:
        return max(1, len(self.classes))

    @property
    def files(self) -> list[Path]:
        return [p for p, _ in self.items]

    def load(self, i: int) -> torch.Tensor:
        x = load_image(self.items[i][0], self.image_size, self.channels, self.alpha_background)
        return x[:, None]  # (C, H, W) -> (C, T=1, H, W)
