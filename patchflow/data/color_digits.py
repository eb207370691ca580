"""The `color-digits` world: 32x32 RGB text-to-image, a coloured MNIST digit (or a two-digit number) on a
coloured background, at a position, with a caption that states all of it.

Canonical captions (`caption(i)`; lower case, the digit always a numeral; A is "a", or "an" before a vowel):

    A COLOR D on A BG background, POSITION        a red 7 on a black background, in the center
                                                  an orange 3 on a blue background, on the left
    the number NN in COLOR on A BG background     the number 42 in green on a gray background

D: 0-9. NN: 10-99. COLOR, BG: red green blue yellow magenta cyan white orange gray black; COLOR != BG, and the
pairs too close to tell apart (`worlds.EXCLUDED_PAIRS`, either order: yellow/orange, white/yellow, cyan/white,
yellow/cyan, green/yellow, green/cyan, red/gray, red/magenta, magenta/gray) are never drawn. POSITION: in the
center | on the left | on the right | at the top | at the bottom. A number has no position phrase.

Paraphrases (`caption(i, paraphrase=True)`, fixed per item; about half the items keep the canonical caption):
the digit as a numeral or a word (zero-nine), "grey" for gray, "the digit D in COLOR ...", short forms
("a red seven, on black", "red 7 on black, at the top", "42 in green on gray", "the number 42 in green, on grey")
and position variants (in the centre | in the middle | no phrase for a centred digit; on the left side | to the
left; on the right side | to the right; near the top | in the upper half; near the bottom | in the lower half).

`parse_caption` reads exactly this grammar (case and runs of whitespace ignored; [x] optional, a|b a choice):

    [A ]COLOR DIGIT[,] on BACKGROUND[, PLACE]
    the digit DIGIT in COLOR[,] on BACKGROUND[, PLACE]
    [the number ]NN in COLOR[,] on BACKGROUND

with BACKGROUND = "A COLOR background" | "COLOR", COLOR also "grey", DIGIT = 0-9 | zero-nine, PLACE any position
phrase above; no PLACE means the centre. Equal colours are refused; excluded pairs are parsed (never drawn).

Layout (x rightwards, y downwards, pixel centres at integers, so the canvas centre is (15.5, 15.5)). Ink is the
stroke coverage alpha; a glyph is an MNIST digit resized (anti-aliased, natural aspect ratio) to an ink height,
its bounding box of ink pixels. Every ink pixel lies in rows and columns 1-30 (>= 1 px from the border).
- A single digit: ink height 16-26 px (width at most 28); its ink's centre of mass is within 0.5 px of the
  canvas centre ("centre"), or shifted 3-5 px left, right, up or down with the other coordinate within 0.5 px of
  the centre. A digit that would not fit at its drawn height is made shorter (not below 16 px; a glyph still too
  wide at 16 px is narrowed); `attributes(i)["size"]` is the ink height drawn.
- A number: its two digits at one ink height of 14-20 px (each at most 13 px wide), tops aligned, 1-3 empty
  columns between their ink boxes; the pair's centre of mass within 0.5 px of the canvas centre. A pair that
  would not fit is made shorter (not below 14 px; a pair still too wide at 14 px is narrowed).
Proportions: 25% numbers (10-99 uniformly), the rest single digits, the five positions equally likely. A training
run may draw numbers more often (`number_share`, `data.number_share`); the validation split keeps 25%.
The stroke is an alpha mask blended between the background and the digit colour.

Item i of a split is a pure function of (split, seed, i), drawn on the fly; train items use only the train
MNIST digits and validation items only the validation digits.
"""
from __future__ import annotations

import re

import numpy as np

from patchflow.data.config import NUMBER_SHARE
from patchflow.data.worlds import (
    CENTRE, COLOR_NAMES, COLORS, DIGIT_WORDS, MARGIN, SIZE, World, article, check_colors, compose, mass_centre,
    normalize, parse_digit, paste, pick_colors,
)

__all__ = ["ColorDigitsDataset", "parse_caption", "COLORS", "POSITIONS", "CAPTION_FIELDS", "GRAMMAR"]

POSITIONS = ("centre", "left", "right", "top", "bottom")
# the canonical phrase of each position
POSITION_PHRASES = {"centre": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
# every phrase of each position a paraphrase may use (the canonical one first); "" = no phrase (centre only)
POSITION_VARIANTS = {"centre": ("in the center", "in the centre", "in the middle", ""),
                     "left": ("on the left", "on the left side", "to the left"),
                     "right": ("on the right", "on the right side", "to the right"),
                     "top": ("at the top", "near the top", "in the upper half"),
                     "bottom": ("at the bottom", "near the bottom", "in the lower half")}
_POSITION_OF = {phrase: pos for pos, phrases in POSITION_VARIANTS.items() for phrase in phrases if phrase}
# the fields a caption determines: parse_caption(caption(i, paraphrase=p)) equals attributes(i) on these
CAPTION_FIELDS = ("kind", "digits", "number", "digit", "color", "color_rgb", "background", "background_rgb",
                  "position")
COLOR_SYNONYMS = {"grey": "gray"}
CANONICAL_SHARE = 0.5  # of paraphrased captions, the share that stays canonical
WORD_PROBABILITY = GREY_PROBABILITY = 0.5  # within a paraphrase

DIRECTION = {"centre": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
SINGLE_HEIGHT, SINGLE_MAX_WIDTH = (16, 26), 28  # a single digit's ink height range and width cap, px
SHIFT = (3.0, 5.0)  # a shifted digit's centre of mass, px from the canvas centre along its axis
NUMBER_HEIGHT, NUMBER_MAX_WIDTH = (14, 20), 13  # each of a number's two digits
GAP = (1, 3)  # empty columns between a number's two ink boxes

_COLOR = "(" + "|".join(COLOR_NAMES + tuple(COLOR_SYNONYMS)) + ")"
_DIGIT = "([0-9]|" + "|".join(DIGIT_WORDS) + ")"
_BACKGROUND = rf"(?:an? {_COLOR} background|{_COLOR})"
_PLACE = "(?:, (" + "|".join(sorted(_POSITION_OF, key=len, reverse=True)) + "))?"
_SINGLE = re.compile(rf"(?:an? )?{_COLOR} {_DIGIT},? on {_BACKGROUND}{_PLACE}")
_THE_DIGIT = re.compile(rf"the digit {_DIGIT} in {_COLOR},? on {_BACKGROUND}{_PLACE}")
_NUMBER = re.compile(rf"(?:the number )?([1-9][0-9]) in {_COLOR},? on {_BACKGROUND}")
GRAMMAR = ("'[A ]COLOR DIGIT[,] on BACKGROUND[, PLACE]' | 'the digit DIGIT in COLOR[,] on BACKGROUND[, PLACE]' | "
           "'[the number ]NN in COLOR[,] on BACKGROUND'; A: a | an; BACKGROUND: 'A COLOR background' | 'COLOR'; "
           f"COLOR: {' | '.join(COLOR_NAMES + tuple(COLOR_SYNONYMS))}; DIGIT: 0-9 | zero-nine; NN: 10-99; "
           f"PLACE: {' | '.join(_POSITION_OF)} (none: the centre); "
           "e.g. 'a red 7 on a black background, in the center', 'the number 42 in green on a gray background'")


def _fields(kind: str, digits, color: str, background: str, position: str) -> dict:
    digits = tuple(int(d) for d in digits)
    return {"kind": kind, "digits": digits, "number": int("".join(map(str, digits))),
            "digit": digits[0] if kind == "digit" else None, "color": color, "color_rgb": COLORS[color],
            "background": background, "background_rgb": COLORS[background], "position": position}


def _color(name: str) -> str:
    return COLOR_SYNONYMS.get(name, name)


def parse_caption(text: str) -> dict:
    """A canonical or paraphrased caption -> its attributes (exactly the CAPTION_FIELDS). Case and extra
    whitespace are ignored.

    Raises ValueError, showing the grammar (see the module docstring), for text outside it or with equal colours.
    """
    s = normalize(text)
    m = _SINGLE.fullmatch(s)
    if m:
        color, token, bg_long, bg_short, place = m.groups()
    elif m := _THE_DIGIT.fullmatch(s):
        token, color, bg_long, bg_short, place = m.groups()
    elif m := _NUMBER.fullmatch(s):
        number, color, bg_long, bg_short = m.groups()
        color, background = _color(color), _color(bg_long or bg_short)
        check_colors(color, background, text)
        return _fields("number", tuple(int(c) for c in number), color, background, "centre")
    else:
        raise ValueError(f"caption {text!r} is outside the color-digits grammar: {GRAMMAR}")
    color, background = _color(color), _color(bg_long or bg_short)
    check_colors(color, background, text)
    return _fields("digit", (parse_digit(token)[0],), color, background, _POSITION_OF[place] if place else "centre")


def _coordinate(com: float, sign: int, shift: float) -> int:
    """Top-left coordinate putting an ink block whose centre of mass is `com` px from its first pixel at the
    canvas centre (sign 0, within 0.5 px) or `shift` px before (-1) / after (+1) it, kept within SHIFT."""
    if sign == 0:
        return int(round(CENTRE - com))
    p = int(round(CENTRE + sign * shift - com))
    reached = (p + com - CENTRE) * sign
    if reached < SHIFT[0]:  # rounding went below the range (by <= 0.5 px): one pixel further out
        p += sign
    elif reached > SHIFT[1]:
        p -= sign
    return p


def _place(block: np.ndarray, position: str, shift: float) -> tuple[int, int] | None:
    """Top-left (x, y) of an (h, w) ink block placed per `position`; None if some ink would leave rows/columns
    MARGIN..SIZE-1-MARGIN."""
    cx, cy = mass_centre(block)
    dx, dy = DIRECTION[position]
    x, y = _coordinate(cx, dx, shift), _coordinate(cy, dy, shift)
    h, w = block.shape
    if x < MARGIN or y < MARGIN or x + w > SIZE - MARGIN or y + h > SIZE - MARGIN:
        return None
    return x, y


class ColorDigitsDataset(World):
    """Items (x, label): x float32 (3, 1, 32, 32) in [-1, 1]; label = the digit (0-9), for a number its first
    digit. `target="caption"` / `"paraphrase"` gives the caption string instead of the label.

    Default sizes: 20,000 train items, 1,000 validation items (`size` overrides). `number_share`: the share of
    two-digit numbers (the world's: 0.25).
    """

    WORLD = 1
    SIZES = {"train": 20_000, "val": 1_000}
    parse_caption = staticmethod(parse_caption)

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None, target: str = "label",
                 number_share: float = NUMBER_SHARE):
        super().__init__(split, seed, size, target)
        self.number_share = float(number_share)
        if not 0 <= self.number_share <= 1:
            raise ValueError(f"number_share must be in 0..1, got {number_share!r}")

    def attributes(self, i: int) -> dict:
        """Everything about item i: the CAPTION_FIELDS, plus `size` (ink height of each glyph, px), `boxes`
        ((x, y, w, h) ink box of each glyph, top-left origin, x rightwards), `bbox` ((x0, y0, x1, y1), ends
        exclusive, around all ink), `com` ((x, y) of the ink's centre of mass, pixel centres at integers),
        `offset` (com minus the canvas centre (15.5, 15.5)), `glyph_size` ((height, max_width) each glyph was
        resized with, see `Glyphs.ink`), `mnist_index` (each glyph's index among the 5,000 MNIST digits) and
        `split_index` (its index in this split's digits)."""
        rng, g = self.rng(i), self.glyphs
        color, background = pick_colors(rng)
        if rng.random() < self.number_share:
            kind, position = "number", "centre"
            digits = (int(rng.integers(1, 10)), int(rng.integers(10)))
            h0 = int(rng.integers(NUMBER_HEIGHT[0], NUMBER_HEIGHT[1] + 1))
            gap = int(rng.integers(GAP[0], GAP[1] + 1))
            js = [g.pick(rng, d) for d in digits]
            low, shift = NUMBER_HEIGHT[0], 0.0
            # drawn height, then shorter down to the minimum; then narrower at the minimum; then shorter still
            tries = ([(h, NUMBER_MAX_WIDTH) for h in range(h0, low - 1, -1)]
                     + [(low, w) for w in range(NUMBER_MAX_WIDTH - 1, 2, -1)]
                     + [(h, NUMBER_MAX_WIDTH) for h in range(low - 1, 1, -1)])
        else:
            kind, gap = "digit", 0
            digits = (int(rng.integers(10)),)
            position = POSITIONS[rng.integers(len(POSITIONS))]
            h0 = int(rng.integers(SINGLE_HEIGHT[0], SINGLE_HEIGHT[1] + 1))
            shift = float(rng.uniform(*SHIFT))
            js = [g.pick(rng, digits[0])]
            low = SINGLE_HEIGHT[0]
            # drawn height, then shorter down to the minimum; then narrower at the minimum; then shorter still
            tries = ([(h, SINGLE_MAX_WIDTH) for h in range(h0, low - 1, -1)]
                     + [(low, w) for w in range(g.ink(js[0], low, SINGLE_MAX_WIDTH).shape[1] - 1, 2, -1)]
                     + [(h, SINGLE_MAX_WIDTH) for h in range(low - 1, 1, -1)])
        for glyph_size in tries:
            inks = [g.ink(j, *glyph_size) for j in js]
            block, lefts = _side_by_side(inks, gap)
            placed = _place(block, position, shift)
            if placed is not None:
                break
        else:  # 2-px-tall glyphs fit anywhere, so a layout is always found
            raise RuntimeError(f"item {i}: no layout fits the canvas")
        x, y = placed
        boxes = tuple((x + left, y, a.shape[1], a.shape[0]) for left, a in zip(lefts, inks))
        cx, cy = mass_centre(block)
        attrs = _fields(kind, digits, color, background, position)
        attrs.update(size=max(a.shape[0] for a in inks), boxes=boxes,
                     bbox=(x, y, x + block.shape[1], y + block.shape[0]), com=(x + cx, y + cy),
                     offset=(x + cx - CENTRE, y + cy - CENTRE), glyph_size=glyph_size,
                     mnist_index=tuple(int(g.index[j]) for j in js), split_index=tuple(js))
        return attrs

    def caption(self, i: int, paraphrase: bool = False) -> str:
        """The canonical caption of item i, or (paraphrase=True) a paraphrase or the canonical caption (about
        half each), fixed per item. parse_caption reads both back to the item's CAPTION_FIELDS."""
        a = self.attributes(i)
        canonical = canonical_caption(a)
        if not paraphrase:
            return canonical
        rng = self.rng(i, stream=1)
        if rng.random() < CANONICAL_SHARE:
            return canonical
        return _paraphrase(a, rng)

    def label(self, attrs: dict) -> int:
        """The class label: the digit, or a number's first digit."""
        return attrs["digits"][0]

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i as (uint8 RGB (32, 32, 3), float32 stroke coverage alpha (32, 32) in [0, 1])."""
        rgb, alpha = self._render(self._check(i))
        return rgb[0], alpha[0]

    def _render(self, i: int, attrs: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (1, 32, 32, 3), float32 (1, 32, 32)); the frame axis is what the model's T is."""
        a = self.attributes(i) if attrs is None else attrs
        alpha = np.zeros((1, SIZE, SIZE), np.float32)
        for j, (x, y, _, _) in zip(a["split_index"], a["boxes"]):
            paste(alpha[0], self.glyphs.ink(j, *a["glyph_size"]), x, y)
        return compose(alpha, a["color"], a["background"]), alpha


def canonical_caption(a: dict) -> str:
    """The canonical caption of attributes `a` (kind, digit or number, color, background, position)."""
    color, bg = a["color"], a["background"]
    if a["kind"] == "number":
        return f"the number {a['number']} in {color} on {article(bg)} {bg} background"
    return f"{article(color)} {color} {a['digit']} on {article(bg)} {bg} background, {POSITION_PHRASES[a['position']]}"


def _side_by_side(inks: list[np.ndarray], gap: int) -> tuple[np.ndarray, list[int]]:
    """Ink blocks (h_k, w_k), tops aligned, `gap` empty columns apart -> (one block, each one's left column)."""
    lefts = np.cumsum([0] + [a.shape[1] + gap for a in inks[:-1]]).tolist()
    block = np.zeros((max(a.shape[0] for a in inks), lefts[-1] + inks[-1].shape[1]), np.float32)
    for left, a in zip(lefts, inks):
        block[:a.shape[0], left:left + a.shape[1]] = a
    return block, lefts


def _paraphrase(a: dict, rng: np.random.Generator) -> str:
    """One paraphrase of an item's caption, drawn with `rng` (see the module docstring for the forms)."""
    color, bg = a["color"], a["background"]
    if color == "gray" and rng.random() < GREY_PROBABILITY:
        color = "grey"
    if bg == "gray" and rng.random() < GREY_PROBABILITY:
        bg = "grey"
    A, B = article(color), article(bg)
    if a["kind"] == "number":
        n = a["number"]
        options = [f"the number {n} in {color} on {B} {bg} background", f"{n} in {color} on {bg}",
                   f"the number {n} in {color}, on {bg}", f"{n} in {color} on {B} {bg} background"]
        return options[rng.integers(len(options))]
    d = DIGIT_WORDS[a["digit"]] if rng.random() < WORD_PROBABILITY else str(a["digit"])
    variants = POSITION_VARIANTS[a["position"]]
    phrase = variants[rng.integers(len(variants))]
    place = f", {phrase}" if phrase else ""
    options = [f"{A} {color} {d} on {B} {bg} background{place}",
               f"the digit {d} in {color} on {B} {bg} background{place}",
               f"{A} {color} {d}, on {bg}{place}", f"{color} {d} on {bg}{place}"]
    return options[rng.integers(len(options))]
