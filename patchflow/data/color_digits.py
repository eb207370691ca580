"""The `color-digits` world: 32x32 RGB text-to-image, a coloured MNIST digit (or a two-digit number) on a
coloured background, at a position, with a caption that states all of it.

Canonical captions (lower case; `A` is "a", or "an" before a vowel: "an orange 7"):

    A COLOR DIGIT on A BG background[POSITION]        a red 7 on a black background
                                                      a blue three on a white background, on the left
    the number NN in COLOR on A BG background         the number 42 in green on a gray background

COLOR, BG: red green blue yellow magenta cyan white orange gray black (COLOR != BG). DIGIT: 0-9 or
zero-nine. NN: 10-99. POSITION: ", on the left" | ", on the right" | ", at the top" | ", at the bottom";
a centred digit has no position phrase (", in the centre" / ", in the center" are also parsed). Numbers are
always centred.

Layout (x rightwards, y downwards, glyphs never touch the border): a glyph is an MNIST digit cropped to its
strokes and scaled to a height (centre 18-24 px, left/right 16-24, top/bottom 12-15; a number's two digits
14-20 each, side by side, 0-2 px apart). A side digit's whole box lies in its half and its ink's centre of
mass is 6-10 px from that edge; a centred digit's ink centre of mass is within ~2.5 px of the canvas centre.
The stroke is an alpha mask blended between the background and the digit colour.

Item i of a split is a pure function of (split, seed, i), drawn on the fly; train items use only the train
MNIST digits and validation items only the validation digits.
"""
from __future__ import annotations

import re

import numpy as np

from patchflow.data.worlds import (
    ARTICLE_RE, COLOR_NAMES, COLOR_RE, COLORS, DIGIT_RE, MARGIN, SIZE, World, article, check_colors, compose,
    digit_text, normalize, parse_digit, paste, pick_colors,
)

__all__ = ["ColorDigitsDataset", "parse_caption", "COLORS", "POSITIONS", "CAPTION_FIELDS"]

POSITIONS = ("centre", "left", "right", "top", "bottom")
POSITION_PHRASES = {"centre": "", "left": ", on the left", "right": ", on the right", "top": ", at the top",
                    "bottom": ", at the bottom"}
# the fields a caption determines: parse_caption(caption(i)) equals attributes(i) on these
CAPTION_FIELDS = ("kind", "digits", "number", "digit", "word", "color", "color_rgb", "background",
                  "background_rgb", "position")
NUMBER_PROBABILITY = 0.25
WORD_PROBABILITY = 0.5
# position -> (min height, max height, max width) of a single digit, in pixels
LAYOUT = {"centre": (18, 24, 24), "left": (16, 24, 15), "right": (16, 24, 15), "top": (12, 15, 20),
          "bottom": (12, 15, 20)}
CENTRE = (SIZE - 1) / 2  # the canvas centre in pixel-centre coordinates
SIDE = (6.0, 10.0)  # a side digit's ink centre of mass, in pixels from its side's edge pixel
NUMBER_HEIGHT, NUMBER_WIDTH = (14, 20), 12  # each of a number's two digits

_DIGIT = re.compile(rf"{ARTICLE_RE} {COLOR_RE} {DIGIT_RE} on {ARTICLE_RE} {COLOR_RE} background"
                    r"(?:, (on the left|on the right|at the top|at the bottom|in the centre|in the center))?")
_NUMBER = re.compile(rf"the number ([1-9][0-9]) in {COLOR_RE} on {ARTICLE_RE} {COLOR_RE} background")
PARAPHRASED_POSITIONS = {"centre": ["", ", in the centre", " in the middle"],
                         "left": [", on the left", " on the left side", ", to the left"],
                         "right": [", on the right", " on the right side", ", to the right"],
                         "top": [", at the top", " near the top", ", in the upper half"],
                         "bottom": [", at the bottom", " near the bottom", ", in the lower half"]}
_POSITION_OF = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
                "in the centre": "centre", "in the center": "centre"}


def _fields(kind, digits, word, color, background, position) -> dict:
    digits = tuple(int(d) for d in digits)
    return {"kind": kind, "digits": digits, "number": int("".join(map(str, digits))),
            "digit": digits[0] if kind == "digit" else None, "word": bool(word),
            "color": color, "color_rgb": COLORS[color], "background": background,
            "background_rgb": COLORS[background], "position": position}


def parse_caption(text: str) -> dict:
    """Canonical caption -> its attributes (the CAPTION_FIELDS). Case and extra whitespace are ignored.

    Raises ValueError for text outside the grammar (see the module docstring), or with equal colours.
    """
    s = normalize(text)
    m = _DIGIT.fullmatch(s)
    if m:
        color, token, background, pos = m.groups()
        check_colors(color, background, text)
        digit, word = parse_digit(token)
        return _fields("digit", (digit,), word, color, background, _POSITION_OF[pos] if pos else "centre")
    m = _NUMBER.fullmatch(s)
    if m:
        number, color, background = m.groups()
        check_colors(color, background, text)
        return _fields("number", tuple(int(c) for c in number), False, color, background, "centre")
    raise ValueError(
        f"caption {text!r} is outside the color-digits grammar; expected 'a COLOR DIGIT on a COLOR background' "
        f"with an optional ', on the left' / ', on the right' / ', at the top' / ', at the bottom', or "
        f"'the number NN in COLOR on a COLOR background' (NN 10-99); DIGIT is 0-9 or zero-nine; colours: "
        f"{', '.join(COLOR_NAMES)}")


def _jitter(rng, centre_start: int, spread: int, lo: int, hi: int) -> int:
    return int(np.clip(centre_start + rng.integers(-spread, spread + 1), lo, hi))


class ColorDigitsDataset(World):
    """Items (x, label): x float32 (3, 1, 32, 32) in [-1, 1]; label = the digit (0-9), for a number its first
    digit. `target="caption"` / `"paraphrase"` gives the caption string instead of the label.

    Default sizes: 20,000 train items, 1,000 validation items (`size` overrides).
    """

    WORLD = 1
    SIZES = {"train": 20_000, "val": 1_000}
    parse_caption = staticmethod(parse_caption)

    def attributes(self, i: int) -> dict:
        """Everything about item i: the CAPTION_FIELDS, plus `size` (glyph height, px), `boxes` ((x, y, w, h)
        of each glyph, top-left origin, x rightwards), `bbox` ((x0, y0, x1, y1), ends exclusive, around all
        glyphs), `mnist_index` (each glyph's index among the 5,000 MNIST digits) and `split_index` (its index in
        this split's digits)."""
        rng, g = self.rng(i), self.glyphs
        color, background = pick_colors(rng)
        lo = MARGIN
        if rng.random() < NUMBER_PROBABILITY:
            kind, digits, word, position = "number", (int(rng.integers(1, 10)), int(rng.integers(10))), False, "centre"
            h = int(rng.integers(NUMBER_HEIGHT[0], NUMBER_HEIGHT[1] + 1))
            js = [g.pick(rng, d) for d in digits]
            ws = [g.width(j, h, NUMBER_WIDTH) for j in js]
            gap = int(rng.integers(0, 3))
            total = ws[0] + gap + ws[1]
            x = _jitter(rng, round((SIZE - total) / 2), 2, lo, SIZE - MARGIN - total)
            y = _jitter(rng, round((SIZE - h) / 2), 2, lo, SIZE - MARGIN - h)
            boxes = ((x, y, ws[0], h), (x + ws[0] + gap, y, ws[1], h))
        else:
            kind, digits = "digit", (int(rng.integers(10)),)
            word = bool(rng.random() < WORD_PROBABILITY)
            position = POSITIONS[rng.integers(len(POSITIONS))]
            hmin, hmax, wmax = LAYOUT[position]
            h = int(rng.integers(hmin, hmax + 1))
            js = [g.pick(rng, digits[0])]
            w = g.width(js[0], h, wmax)
            hi_x, hi_y, half = SIZE - MARGIN - w, SIZE - MARGIN - h, SIZE // 2
            ox, oy = g.centre_offset(js[0], h, w)
            # the ink's centre of mass (not the box's centre) is placed, as MNIST centres digits; a side
            # digit's centre of mass lies in SIDE of its side's edge and its whole box in that half
            if position == "left":
                x = int(np.clip(round(rng.uniform(*SIDE) - ox), lo, half - w))
                y = _jitter(rng, round(CENTRE - oy), 3, lo, hi_y)
            elif position == "right":
                x = int(np.clip(round(SIZE - 1 - rng.uniform(*SIDE) - ox), half, hi_x))
                y = _jitter(rng, round(CENTRE - oy), 3, lo, hi_y)
            elif position == "top":
                x = _jitter(rng, round(CENTRE - ox), 3, lo, hi_x)
                y = int(np.clip(round(rng.uniform(*SIDE) - oy), lo, half - h))
            elif position == "bottom":
                x = _jitter(rng, round(CENTRE - ox), 3, lo, hi_x)
                y = int(np.clip(round(SIZE - 1 - rng.uniform(*SIDE) - oy), half, hi_y))
            else:
                x = _jitter(rng, round(CENTRE - ox), 2, lo, hi_x)
                y = _jitter(rng, round(CENTRE - oy), 2, lo, hi_y)
            boxes = ((x, y, w, h),)
        attrs = _fields(kind, digits, word, color, background, position)
        attrs.update(size=h, boxes=boxes,
                     bbox=(boxes[0][0], boxes[0][1], boxes[-1][0] + boxes[-1][2], boxes[0][1] + h),
                     mnist_index=tuple(int(g.index[j]) for j in js), split_index=tuple(js))
        return attrs

    def caption(self, i: int, paraphrase: bool = False) -> str:
        """The canonical caption of item i, or (paraphrase=True) one of a few paraphrases, fixed per item
        (the canonical caption is one of them; paraphrases are not meant for parse_caption)."""
        a = self.attributes(i)
        color, bg = a["color"], a["background"]
        A, B = article(color), article(bg)
        if a["kind"] == "number":
            n = a["number"]
            if not paraphrase:
                return f"the number {n} in {color} on {B} {bg} background"
            options = [f"the number {n} in {color} on {B} {bg} background",
                       f"{A} {color} {n} on {B} {bg} background",
                       f"the number {n} written in {color} on {B} {bg} background",
                       f"{n} in {color} on {bg}"]
            return options[self.rng(i, stream=1).integers(len(options))]
        d = digit_text(a["digit"], a["word"])
        if not paraphrase:
            return f"{A} {color} {d} on {B} {bg} background{POSITION_PHRASES[a['position']]}"
        rng = self.rng(i, stream=1)
        pos = PARAPHRASED_POSITIONS[a["position"]]
        p = pos[rng.integers(len(pos))]
        options = [f"{A} {color} {d} on {B} {bg} background{p}",
                   f"the digit {d} in {color} on {B} {bg} background{p}",
                   f"{A} {color} {d} against {B} {bg} background{p}",
                   f"{B} {bg} background with {A} {color} {d}{p}",
                   f"{color} {d} on {bg}{p}"]
        return options[rng.integers(len(options))]

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
        for j, (x, y, w, h) in zip(a["split_index"], a["boxes"]):
            paste(alpha[0], self.glyphs.alpha(j, h, w), x, y)
        return compose(alpha, a["color"], a["background"]), alpha
