"""The `moving-digits` world: text-to-video clips of 32x32 RGB frames (default 9, any count >= 1), a coloured MNIST
digit on a coloured background moving at a constant speed (1-3 px/frame) left, right, up or down, bouncing off
the walls.

Canonical caption (lower case; `A` is "a", or "an" before a vowel: "an orange 7"):

    A COLOR DIGIT moving DIRECTION on A BG background      a red 7 moving left on a black background

COLOR, BG: red green blue yellow magenta cyan white orange gray black; COLOR != BG, and the pairs too close to tell
apart (`worlds.EXCLUDED_PAIRS`, the color-digits ones) are never drawn. DIGIT: 0-9 or zero-nine. DIRECTION:
left | right | up | down, the initial direction (a bounce reverses it; every clip moves at least two steps in it
before its first bounce). The speed is not in the caption.

Glyph: an MNIST digit of the split resized (anti-aliased, natural aspect ratio, at most 16 px wide; 15 px for
the few wide glyphs that would lose a faint edge row at 16) to an INK height of 14-20 px, trimmed to its ink
(`Glyphs.ink`, as color-digits draws), so the ink's bounding box in every frame is exactly `size` x `width` px.
The stroke is an alpha mask blended between the background and the digit colour.

Motion: the ink box's top-left corner moves by `speed` px per frame along one axis, inside [1, 31 - extent] (ink
stays >= 1 px from the border, so it is never clipped); a step past a wall is reflected back off it (position
2 * wall - position) and the direction reverses. The start is uniform over the positions that leave room for two
steps in the captioned direction; the other coordinate is uniform and stays fixed. With `start_grid=g` (a
training option, `data.start_grid`) that start is then moved to the allowed one whose ink centre of mass lies
nearest the grid of spacing g through the canvas centre (15.5 + g * k on both axes), so every clip starts in one of
a few token-aligned places. Frame 0 alone is a color-digits-style image. Item i is a pure function of (split, seed,
i); a clip of T frames is the first T frames of any longer clip of the same item.
"""
from __future__ import annotations

import re

import numpy as np

from patchflow.data.worlds import (
    ARTICLE_RE, CENTRE, COLOR_NAMES, COLOR_RE, COLORS, DIGIT_RE, MARGIN, SIZE, World, article, check_colors, compose,
    digit_text, mass_centre, normalize, parse_digit, paste, pick_colors,
)

__all__ = ["MovingDigitsDataset", "parse_caption", "COLORS", "DIRECTIONS", "CAPTION_FIELDS"]

DIRECTIONS = ("left", "right", "up", "down")
VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
SPEEDS = (1, 2, 3)
HEIGHT, MAX_WIDTH = (14, 20), 16  # ink height range and width cap, px: leaves >= 10 px of travel on each axis
FREE_STEPS = 2  # steps in the captioned direction before any bounce
WORD_PROBABILITY = 0.5
# the fields a caption determines: parse_caption(caption(i)) equals attributes(i) on these
CAPTION_FIELDS = ("digit", "word", "color", "color_rgb", "background", "background_rgb", "direction")

_CAPTION = re.compile(rf"{ARTICLE_RE} {COLOR_RE} {DIGIT_RE} moving (left|right|up|down) on {ARTICLE_RE} "
                      rf"{COLOR_RE} background")
_GOING = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}


def parse_caption(text: str) -> dict:
    """Canonical caption -> its attributes (the CAPTION_FIELDS). Case and extra whitespace are ignored.

    Raises ValueError for text outside the grammar (see the module docstring), or with equal colours.
    """
    m = _CAPTION.fullmatch(normalize(text))
    if not m:
        raise ValueError(
            f"caption {text!r} is outside the moving-digits grammar; expected 'a COLOR DIGIT moving DIRECTION "
            f"on a COLOR background', e.g. 'a red 7 moving left on a black background'; DIGIT is 0-9 or "
            f"zero-nine, DIRECTION one of {', '.join(DIRECTIONS)}; colours: {', '.join(COLOR_NAMES)}")
    color, token, direction, background = m.groups()
    check_colors(color, background, text)
    digit, word = parse_digit(token)
    return {"digit": digit, "word": word, "color": color, "color_rgb": COLORS[color], "background": background,
            "background_rgb": COLORS[background], "direction": direction}


def trajectory(start: int, velocity: int, lo: int, hi: int, frames: int) -> tuple[list[int], list[int]]:
    """Positions on one axis for `frames` frames, bouncing inside [lo, hi]; and the frames whose step bounced."""
    pos, v, out, bounces = start, velocity, [start], []
    for t in range(1, frames):
        pos += v
        if pos < lo or pos > hi:  # reflect off the wall; hi - lo >= 2 * max speed, so one reflection suffices
            pos = 2 * (lo if pos < lo else hi) - pos
            v = -v
            bounces.append(t)
        out.append(pos)
    return out, bounces


class MovingDigitsDataset(World):
    """Items (x, label): x float32 (3, frames, 32, 32) in [-1, 1]; label = the digit (0-9).
    `target="caption"` / `"paraphrase"` gives the caption string instead of the label.

    Default sizes: 10,000 train clips, 500 validation clips (`size` overrides); `frames` >= 1 (default 9).
    """

    WORLD = 3  # 3: ink heights 14-20 px (Glyphs.ink); 2 drew glyph boxes 12-18 px tall
    SIZES = {"train": 10_000, "val": 500}
    parse_caption = staticmethod(parse_caption)

    def __init__(self, split: str = "train", seed: int = 0, frames: int = 9, size: int | None = None,
                 target: str = "label", start_grid: int = 0):
        if int(frames) != frames or frames < 1:
            raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
        if int(start_grid) != start_grid or not 0 <= start_grid <= SIZE:
            raise ValueError(f"start_grid must be 0 (uniform starts) or a spacing of 1-{SIZE} px, got {start_grid!r}")
        super().__init__(split, seed, size, target)
        self.frames = int(frames)
        self.start_grid = int(start_grid)

    def attributes(self, i: int) -> dict:
        """Everything about clip i: the CAPTION_FIELDS, plus `kind` ("digit"), `digits`, `number`, `speed`
        (px/frame), `size` (the glyph's ink height, 14-20 px: the height of its ink box in every frame), `width`
        (its ink width, <= 16 px), `glyph_size` ((height, max_width) the glyph was resized with, see
        `Glyphs.ink`), `start` ((x, y) of the ink box's top-left corner in frame 0, x rightwards, y downwards),
        `positions` (that corner in every frame), `com` ((x, y) of the ink's centre of mass in every frame,
        pixel centres at integers), `bounces` (frames t whose step t-1 -> t hit a wall), `frames`, `mnist_index`
        and `split_index` (as in color-digits)."""
        rng, g = self.rng(i), self.glyphs
        color, background = pick_colors(rng)
        digit = int(rng.integers(10))
        word = bool(rng.random() < WORD_PROBABILITY)
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        speed = int(SPEEDS[rng.integers(len(SPEEDS))])
        height = int(rng.integers(HEIGHT[0], HEIGHT[1] + 1))
        j = g.pick(rng, digit)
        for max_width in range(MAX_WIDTH, 2, -1):  # a wide glyph squeezed to 16 px can lose a faint edge row:
            ink = g.ink(j, height, max_width)     # one px narrower keeps it (the ink height is exactly `height`)
            if ink.shape[0] == height:
                break
        h, w = ink.shape
        dx, dy = VELOCITY[direction]
        hi_x, hi_y = SIZE - MARGIN - w, SIZE - MARGIN - h
        free = FREE_STEPS * speed

        cx, cy = mass_centre(ink)
        grid = self.start_grid

        def start(lo, hi, d, c):  # uniform, leaving room for FREE_STEPS steps in direction d before a wall
            lo, hi = (lo + free if d < 0 else lo), (hi - free if d > 0 else hi)
            v = int(rng.integers(lo, hi + 1))
            if not grid:
                return v
            off = lambda k: abs((k + c - CENTRE + grid / 2) % grid - grid / 2)  # ink centre to the nearest grid line
            return min(range(lo, hi + 1), key=lambda k: (round(off(k), 6), abs(k - v)))  # ties: nearest the draw

        x0, y0 = start(MARGIN, hi_x, dx, cx), start(MARGIN, hi_y, dy, cy)
        xs, bx = trajectory(x0, dx * speed, MARGIN, hi_x, self.frames)
        ys, by = trajectory(y0, dy * speed, MARGIN, hi_y, self.frames)
        return {"kind": "digit", "digit": digit, "digits": (digit,), "number": digit, "word": word,
                "color": color, "color_rgb": COLORS[color], "background": background,
                "background_rgb": COLORS[background], "direction": direction, "speed": speed, "size": h,
                "width": w, "glyph_size": (height, max_width), "start": (x0, y0), "positions": tuple(zip(xs, ys)),
                "com": tuple((x + cx, y + cy) for x, y in zip(xs, ys)), "bounces": tuple(sorted(bx + by)),
                "frames": self.frames, "mnist_index": (int(g.index[j]),), "split_index": (j,)}

    def caption(self, i: int, paraphrase: bool = False) -> str:
        """The canonical caption of clip i, or (paraphrase=True) one of a few paraphrases, fixed per clip."""
        a = self.attributes(i)
        color, bg, direction = a["color"], a["background"], a["direction"]
        A, B, d = article(color), article(bg), digit_text(a["digit"], a["word"])
        options = [f"{A} {color} {d} moving {direction} on {B} {bg} background",
                   f"{A} {color} {d} on {B} {bg} background, moving {direction}",
                   f"the digit {d} in {color} moving {direction} across {B} {bg} background",
                   f"{A} {color} {d} going {_GOING[direction]} on {B} {bg} background"]
        if not paraphrase:
            return options[0]
        return options[self.rng(i, stream=1).integers(len(options))]

    def label(self, attrs: dict) -> int:
        return attrs["digit"]

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip i as (uint8 RGB (frames, 32, 32, 3), float32 stroke coverage alpha (frames, 32, 32))."""
        return self._render(self._check(i))

    def _render(self, i: int, attrs: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        a = self.attributes(i) if attrs is None else attrs
        glyph = self.glyphs.ink(a["split_index"][0], *a["glyph_size"])  # resized once (cached), shifted per frame
        alpha = np.zeros((self.frames, SIZE, SIZE), np.float32)
        for t, (x, y) in enumerate(a["positions"]):
            paste(alpha[t], glyph, x, y)
        return compose(alpha, a["color"], a["background"]), alpha
