"""Pieces shared by the built-in text-conditioned worlds (`color-digits`, `moving-digits`).

Colours (and the colour pairs the worlds draw: never equal, never one of EXCLUDED_PAIRS), digit words, caption
fragments, per-item random generators, MNIST glyphs and rendering a glyph as an alpha mask blended between a
background and a digit colour. Images here are uint8 (..., H, W, 3) RGB until
`to_tensor` turns them into float32 (3, T, H, W) in [-1, 1].
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from patchflow.data.digits import SIZE, load_digits, split_indices  # SIZE is re-exported to the worlds

# name -> RGB; every pair differs by >= 127 in some channel (so a stroke pixel never rounds to the background)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# pairs too close to tell apart by eye (either order): never drawn as a digit colour on a background
EXCLUDED_PAIRS: frozenset[frozenset[str]] = frozenset(frozenset(p) for p in (
    ("yellow", "orange"), ("white", "yellow"), ("cyan", "white"), ("yellow", "cyan"), ("green", "yellow"),
    ("green", "cyan"), ("red", "gray"), ("red", "magenta"), ("magenta", "gray"),
))
# the (digit colour, background colour) pairs the worlds draw: different and not excluded, 72 of the 90
COLOR_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, b) for c in COLOR_NAMES for b in COLOR_NAMES if c != b and frozenset((c, b)) not in EXCLUDED_PAIRS)
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = {"train": 0, "val": 1}
INK_GAIN = 1.5
INK_FLOOR = 0.01  # coverage below this is dropped: every kept stroke pixel differs visibly from the background
CENTRE = (SIZE - 1) / 2  # the canvas centre in pixel-centre coordinates (15.5)
MARGIN = 1  # glyphs never touch the border, so a glyph is never clipped and a pasted shift is exact

# regex pieces for the parsers (captions are lower-cased and whitespace-collapsed before matching)
COLOR_RE = "(" + "|".join(COLOR_NAMES) + ")"
DIGIT_RE = "([0-9]|" + "|".join(DIGIT_WORDS) + ")"
ARTICLE_RE = "an?"  # "an orange", "a red"; either article is accepted when parsing


def article(word: str) -> str:
    """'a' or 'an' for the word that follows ('an orange', 'a red')."""
    return "an" if word[0] in "aeiou" else "a"


def digit_text(digit: int, word: bool) -> str:
    """7 -> '7', or 'seven' when `word`."""
    return DIGIT_WORDS[digit] if word else str(digit)


def parse_digit(token: str) -> tuple[int, bool]:
    """'7' -> (7, False); 'seven' -> (7, True)."""
    return (int(token), False) if token.isdigit() else (DIGIT_WORDS.index(token), True)


def normalize(text: str) -> str:
    """Lower case, outer whitespace stripped, inner whitespace runs collapsed to one space."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string, got {type(text).__name__}")
    return re.sub(r"\s+", " ", text.strip().lower())


def check_colors(color: str, background: str, text: str) -> None:
    if color == background:
        raise ValueError(f"caption {text!r}: the digit colour and the background colour must differ (both {color!r})")


def item_rng(world: int, seed: int, split: str, i: int, stream: int = 0) -> np.random.Generator:
    """The generator of item i: a pure function of (world, seed, split, i, stream), independent of the set's size."""
    return np.random.default_rng([world, seed, SPLITS[split], i, stream])


def legible(color: str, background: str) -> bool:
    """Whether a digit in `color` on `background` is a pair the worlds draw (different, not in EXCLUDED_PAIRS)."""
    return color != background and frozenset((color, background)) not in EXCLUDED_PAIRS


def pick_colors(rng: np.random.Generator) -> tuple[str, str]:
    """(digit colour, background colour), uniform over COLOR_PAIRS: never equal, never an excluded pair."""
    return COLOR_PAIRS[int(rng.integers(len(COLOR_PAIRS)))]


class Glyphs:
    """The MNIST digits of one split, cropped to their strokes, ready to be scaled and pasted.

    `index[j]` is digit j's index among the 5,000 MNIST digits (train and val never share one).
    """

    def __init__(self, split: str, seed: int):
        images, labels = load_digits(split, seed)
        self.index = split_indices(split, seed)
        self.labels = labels
        self.by_class = [np.flatnonzero(labels == c) for c in range(10)]
        self.crops = []
        for im in images:  # tight box around every non-zero pixel; its aspect ratio is the digit's own
            rows, cols = np.flatnonzero(im.any(1)), np.flatnonzero(im.any(0))
            self.crops.append(np.ascontiguousarray(im[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
        # each crop's ink centre of mass as a fraction of its (width, height), pixel edges at 0 and 1
        self.mass_centre = np.array([_mass_centre(c) for c in self.crops], np.float64)
        # resized glyphs are reused: an item's layout and its rendering ask for the same ones
        self._ink = lru_cache(maxsize=4096)(self._render_ink)

    def centre_offset(self, j: int, height: int, width: int) -> tuple[float, float]:
        """(x, y) of glyph j's ink centre of mass, in pixels from its top-left pixel's centre, at this size."""
        fx, fy = self.mass_centre[j]
        return fx * width - 0.5, fy * height - 0.5

    def pick(self, rng: np.random.Generator, digit: int) -> int:
        """A random digit j of class `digit` from this split."""
        members = self.by_class[digit]
        return int(members[rng.integers(len(members))])

    def width(self, j: int, height: int, max_width: int) -> int:
        """Width of glyph j scaled to `height`: its natural aspect ratio, squeezed to at most `max_width`."""
        h, w = self.crops[j].shape
        return int(min(max_width, max(1, round(w * height / h))))

    def alpha(self, j: int, height: int, width: int) -> np.ndarray:
        """Glyph j resized (anti-aliased) to float32 (height, width) in [0, 1]: the stroke's coverage."""
        im = Image.fromarray(self.crops[j]).resize((width, height), Image.LANCZOS)
        a = np.asarray(im, dtype=np.float32)
        # ink saturates at 2/3 of the glyph's peak: thin strokes of small glyphs still show pure colour pixels
        return np.minimum(a * (INK_GAIN / max(float(a.max()), 1.0)), 1.0)


    def ink(self, j: int, height: int, max_width: int) -> np.ndarray:
        """Glyph j as float32 stroke coverage (height, w) in [0, 1], trimmed to its ink: its first and last rows
        and columns hold ink, its ink height is exactly `height` (>= 2), its width the natural aspect ratio's,
        squeezed to at most `max_width`. Coverage below INK_FLOOR is zero. Cached; do not modify the array."""
        return self._ink(int(j), int(height), int(max_width))

    def _render_ink(self, j: int, height: int, max_width: int) -> np.ndarray:
        crop = self.crops[j]
        first = None
        for rows in (height, height + 1, height + 2):  # a faint edge row can vanish when resized: go taller
            w = int(min(max_width, max(1, round(crop.shape[1] * rows / crop.shape[0]))))
            a = np.asarray(Image.fromarray(crop).resize((w, rows), Image.LANCZOS), dtype=np.float32)
            a = np.minimum(a * (INK_GAIN / max(float(a.max()), 1.0)), 1.0)
            a[a < INK_FLOOR] = 0.0
            ys, xs = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
            a = np.ascontiguousarray(a[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1])
            if a.shape[0] == height:
                return a
            first = a if first is None else first
        return first  # not reached for MNIST glyphs at heights >= 2; the caller records the real height


def mass_centre(alpha: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of mass of a (H, W) weight map, in pixel-centre coordinates (pixel (0, 0) at (0, 0))."""
    w = alpha.astype(np.float64)
    total = w.sum()
    if total <= 0:
        raise ValueError("mass_centre of an empty weight map")
    return float(w.sum(0) @ np.arange(w.shape[1]) / total), float(w.sum(1) @ np.arange(w.shape[0]) / total)


def _mass_centre(crop: np.ndarray) -> tuple[float, float]:
    w = crop.astype(np.float64)
    ys, xs = np.mgrid[:crop.shape[0], :crop.shape[1]]
    total = w.sum()
    return (float((w * xs).sum() / total) + 0.5) / crop.shape[1], (float((w * ys).sum() / total) + 0.5) / crop.shape[0]


@lru_cache(maxsize=8)
def glyphs(split: str, seed: int) -> Glyphs:
    """Shared per (split, seed): both worlds and repeated constructions reuse the crops."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return Glyphs(split, seed)


def paste(canvas: np.ndarray, glyph: np.ndarray, x: int, y: int) -> None:
    """Max-composite a (h, w) alpha glyph into a (H, W) alpha canvas with its top-left corner at (x, y)."""
    h, w = glyph.shape
    region = canvas[y:y + h, x:x + w]
    np.maximum(region, glyph, out=region)


def compose(alpha: np.ndarray, color: str, background: str) -> np.ndarray:
    """Alpha (..., H, W) in [0, 1] -> uint8 (..., H, W, 3): background + alpha * (colour - background), rounded."""
    bg = np.asarray(COLORS[background], dtype=np.float32)
    fg = np.asarray(COLORS[color], dtype=np.float32)
    rgb = bg + alpha[..., None] * (fg - bg)
    return (rgb + 0.5).astype(np.uint8)  # values are in [0, 255], so +0.5 and truncation rounds


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(rgb).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


class World(torch.utils.data.Dataset):
    """Base of the built-in text-conditioned worlds. Subclasses define `attributes`, `caption`, `render`, `label`.

    Items are (x, target): x float32 (3, T, 32, 32) in [-1, 1]; target is the digit class (target="label",
    what `build_dataset` returns), the canonical caption (target="caption"), or a paraphrase
    (target="paraphrase").
    """

    WORLD = 0  # distinguishes the worlds' random streams
    SIZES = {"train": 0, "val": 0}

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None, target: str = "label"):
        if target not in ("label", "caption", "paraphrase"):
            raise ValueError(f"target must be 'label', 'caption' or 'paraphrase', got {target!r}")
        self.split, self.seed, self.target = split, seed, target
        self.glyphs = glyphs(split, seed)
        self.size = self.SIZES[split] if size is None else int(size)
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.colors = COLORS

    def __len__(self) -> int:
        return self.size

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"item {i} out of range for a {self.split} set of {self.size}")
        return i

    def glyph_class(self, i: int) -> int:
        """What item i shows as one class: a digit 0-9, a two-digit number 10 + its value (so "42" and "47" differ,
        where `label` gives both 4); the world encoder's supervised contrast groups by it."""
        digits = self.attributes(self._check(i))["digits"]
        return digits[0] if len(digits) == 1 else 10 + int("".join(map(str, digits)))

    def rng(self, i: int, stream: int = 0) -> np.random.Generator:
        return item_rng(self.WORLD, self.seed, self.split, self._check(i), stream)

    def __getitem__(self, i: int):
        i = self._check(i)
        attrs = self.attributes(i)
        x = to_tensor(self._render(i, attrs)[0])
        if self.target == "label":
            return x, self.label(attrs)
        return x, self.caption(i, paraphrase=self.target == "paraphrase")
