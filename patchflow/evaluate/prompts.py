"""Prompt following on the `color-digits` world: GenEval in miniature.

Generated 32x32 RGB images are scored against the prompts they were generated from. The checker shares no code
or weights with the generative model: it reads a prompt with the world's `parse_caption`, names colours with the
world's colour table, and reads digits with patchflow's own MNIST classifier (`evaluate.digits`, trained on grey
28x28 MNIST digits padded to 32x32).

How an image (uint8 (32, 32, 3)) is read:
- **background**: the named colour nearest (RGB, Euclidean) to the per-channel median of the 1-px border ring
  (the world keeps every glyph >= 1 px from the border).
- **ink**: a pixel's distance d from that median colour. The strongest pixels (d >= 0.75 x the 5th largest d)
  are the pure stroke; their d-weighted mean is the ink colour, and every pixel's ink weight is
  clip(d / D, 0, 1), D the distance from the background to the ink colour (for the world's images that is the
  stroke coverage alpha exactly). No ink is seen when the 5th largest d is below 40 (a blank image).
- **colour**: the named colour nearest to the ink colour, the background's name excluded.
- **position**: the ink-weighted centre of mass relative to the canvas centre (15.5, 15.5): "centre" when both
  coordinates are within 2 px of it (the world's centred digits are within 0.5 px, its shifted ones 3-5 px out
  along one axis and within 0.5 px on the other), else the dominant axis and its sign (left/right/top/bottom).
- **digit**: the box of ink weight >= 0.1, resized (aspect kept) so its longer side is 20 px, placed in a 32x32
  grey ink-on-black image with its centre of mass at (16, 16) (where MNIST, padded to 32, puts it), classified.
- **number**: the ink box's columns split into two glyphs at the widest run of empty columns (ink below 2% of
  the fullest column; the run nearest the middle on a tie), or, with no such run, at the emptiest column of the
  box's middle half; each glyph is read as a digit, left to right.

Per attribute, over the parsed prompts it applies to: `digit` (single-digit prompts), `number` (both digits of a
two-digit number, in order), `color`, `background` (every prompt), `position` (single digits), `all` (everything
the prompt asked at once). Prompts outside the grammar are counted as `unparsed` and left out of every rate.

Public API: :func:`score`, :func:`score_npz`, :func:`held_out_prompts`, :func:`real_reference`,
:func:`format_report`, :func:`read_images`, :func:`ink_weights`, :class:`PromptReport`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from patchflow.data.color_digits import ColorDigitsDataset, parse_caption
from patchflow.data.worlds import COLORS

__all__ = ["score", "score_npz", "load_prompted_npz", "parse_prompts", "held_out_prompts", "real_reference", "format_report", "read_images",
           "ink_weights", "PromptReport", "Reading", "SampleRecord", "ATTRIBUTES", "KINDS"]

ATTRIBUTES = ("digit", "number", "color", "background", "position", "all")
KINDS = ("canonical", "paraphrase", "number", "digit")
SIZE = 32
CENTRE = (SIZE - 1) / 2
NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in NAMES], np.float64)
CENTRE_RADIUS = 2.0  # px; centred digits are within 0.5 px of the centre, shifted ones >= 3 px away
STRONG = 0.75  # a pixel is pure stroke when its distance from the background is >= this x the 5th largest
MIN_INK = 40.0  # RGB distance the strongest ink must reach for any ink to be seen
BOX_INK = 0.1  # ink weight that counts towards a glyph's box
GAP_INK = 0.02  # a column emptier than this share of the fullest column separates two glyphs
MNIST_BOX, MNIST_CENTRE = 20, 16.0  # MNIST: a 20 px box, its centre of mass at (16, 16) once padded to 32


@dataclass(frozen=True)
class Reading:
    """What the checker saw in one image. `digits` is () when nothing was read; `offset` is the ink's centre of
    mass minus the canvas centre, (x, y) in px (None without ink)."""

    background: str
    color: str | None
    position: str | None
    digits: tuple[int, ...]
    offset: tuple[float, float] | None


@dataclass
class SampleRecord:
    """One prompt and its image: `asked` is parse_caption(prompt) (None when unparsed), `seen` the Reading
    (None when unparsed), `correct` attribute -> bool for the attributes the prompt applies to."""

    index: int
    prompt: str
    asked: dict | None
    seen: Reading | None
    correct: dict[str, bool] = field(default_factory=dict)


@dataclass
class PromptReport:
    """Per-sample records and, per attribute of ATTRIBUTES, the rate of agreement (NaN when no prompt applies)
    and the number of prompts it applies to; `unparsed` prompts are in no rate."""

    records: list[SampleRecord]
    rates: dict[str, float]
    counts: dict[str, int]
    unparsed: int
    n: int

    def as_dict(self) -> dict:
        """The figures without the records (JSON-ready)."""
        return {"n": self.n, "unparsed": self.unparsed, "rates": dict(self.rates), "counts": dict(self.counts)}


# ---- reading images -----------------------------------------------------------------------------------------
def _nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    d = ((PALETTE - rgb) ** 2).sum(1)
    if exclude is not None:
        d[NAMES.index(exclude)] = np.inf
    return NAMES[int(np.argmin(d))]


def _border(rgb: np.ndarray) -> np.ndarray:
    """The 1-px border ring of (H, W, 3) as (4W - 4, 3)."""
    return np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])


def ink_weights(rgb: np.ndarray) -> tuple[str, str | None, np.ndarray]:
    """How the checker sees one image: uint8 (32, 32, 3) -> (background name, ink colour name or None when no ink
    is seen, ink weight float64 (32, 32) in [0, 1]); see the module docstring (**background**, **ink**,
    **colour**). For the worlds' images the weight is the stroke coverage alpha. `read_images` reads with it;
    `evaluate.clips` tracks a clip's ink with it."""
    x = rgb.astype(np.float64)
    bg_rgb = np.median(_border(x), axis=0)
    background = _nearest(bg_rgb)
    d = np.sqrt(((x - bg_rgb) ** 2).sum(-1))
    top = np.sort(d, axis=None)[-5]  # the 5th largest: a few stray pixels do not set the scale
    if top < MIN_INK:
        return background, None, np.zeros(d.shape)
    strong = d >= STRONG * top
    ink_rgb = (x[strong] * d[strong, None]).sum(0) / d[strong].sum()
    reach = max(float(np.sqrt(((ink_rgb - bg_rgb) ** 2).sum())), 1e-6)
    return background, _nearest(ink_rgb, exclude=background), np.clip(d / reach, 0.0, 1.0)


def _position(w: np.ndarray) -> tuple[str | None, tuple[float, float] | None]:
    total = w.sum()
    if total <= 0:
        return None, None
    dx = float(w.sum(0) @ np.arange(w.shape[1]) / total) - CENTRE
    dy = float(w.sum(1) @ np.arange(w.shape[0]) / total) - CENTRE
    if max(abs(dx), abs(dy)) <= CENTRE_RADIUS:
        return "centre", (dx, dy)
    if abs(dx) >= abs(dy):
        return ("left" if dx < 0 else "right"), (dx, dy)
    return ("top" if dy < 0 else "bottom"), (dx, dy)


def _box(w: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), ends exclusive, around weight >= BOX_INK; None if there is none."""
    ys, xs = np.nonzero(w >= BOX_INK)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _split(w: np.ndarray, box: tuple[int, int, int, int]) -> list[np.ndarray]:
    """The ink in `box` as two glyph maps, left then right (see the module docstring)."""
    x0, y0, x1, y1 = box
    part = np.where(w[y0:y1, x0:x1] >= BOX_INK, w[y0:y1, x0:x1], 0.0)
    profile = part.sum(0)
    empty = profile <= GAP_INK * profile.max()
    runs, start = [], None  # maximal runs of empty columns with ink on both sides
    for c, e in enumerate(empty):
        if e and start is None:
            start = c
        elif not e and start is not None:
            if start > 0:
                runs.append((start, c))
            start = None
    mid = (len(profile) - 1) / 2
    if runs:
        a, b = max(runs, key=lambda r: (r[1] - r[0], -abs((r[0] + r[1] - 1) / 2 - mid)))
    else:  # touching glyphs: cut at the emptiest column of the middle half
        lo, hi = len(profile) // 4, max(len(profile) // 4 + 1, (3 * len(profile)) // 4)
        a = lo + int(np.argmin(profile[lo:hi]))
        b = a + 1 if 0 < a < len(profile) - 1 else a
    a, b = max(a, 1), min(max(b, a), len(profile) - 1)  # both sides keep at least one column
    return [part[:, :a], part[:, b:]]


def _mnist_frame(glyph: np.ndarray) -> np.ndarray:
    """An ink map (h, w) in [0, 1] -> uint8 (32, 32) grey ink on black, framed like the classifier's MNIST digits:
    the ink box scaled (aspect kept) to a longer side of 20 px, its centre of mass at (16, 16)."""
    out = np.zeros((SIZE, SIZE), np.float64)
    box = _box(glyph)
    if box is None:
        return out.astype(np.uint8)
    x0, y0, x1, y1 = box
    crop = glyph[y0:y1, x0:x1].astype(np.float32)
    scale = MNIST_BOX / max(crop.shape)
    w, h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    g = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR), np.float64).clip(0.0, 1.0)
    total = g.sum()
    if total <= 0:
        return out.astype(np.uint8)
    cx, cy = g.sum(0) @ np.arange(w) / total, g.sum(1) @ np.arange(h) / total
    left = int(np.clip(round(MNIST_CENTRE - cx), 0, SIZE - w))
    top = int(np.clip(round(MNIST_CENTRE - cy), 0, SIZE - h))
    out[top:top + h, left:left + w] = g
    return np.rint(out * 255).astype(np.uint8)


@torch.no_grad()
def _classify(frames: list[np.ndarray], classifier) -> list[int]:
    if not frames:
        return []
    from patchflow.evaluate.digits import to_classifier_input

    x = to_classifier_input(np.stack(frames))
    return torch.cat([classifier(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).tolist()


def _get_classifier(classifier):
    if classifier is not None:
        return classifier
    from patchflow.evaluate.digits import get_classifier

    return get_classifier(verbose=False)


def read_images(images: np.ndarray, glyphs: list[int], classifier=None) -> list[Reading]:
    """Read uint8 (N, 32, 32, 3) images; glyphs[k] is how many digits to read in image k (1 or 2).

    `classifier`: a DigitClassifier (default: `evaluate.digits.get_classifier()`, trained once and cached).
    """
    images = _check_images(images, "images")
    if len(glyphs) != len(images) or any(g not in (1, 2) for g in glyphs):
        raise ValueError(f"glyphs must give 1 or 2 for each of the {len(images)} images, got {list(glyphs)[:10]}")
    seen, frames, owner = [], [], []
    for k, (rgb, count) in enumerate(zip(images, glyphs)):
        background, color, w = ink_weights(rgb)
        position, offset = _position(w)
        box = _box(w)
        seen.append((background, color, position, offset))
        if box is None:
            continue
        if count == 1:
            parts = [w[box[1]:box[3], box[0]:box[2]]]
        elif box[2] - box[0] < 2:
            continue  # one column of ink cannot hold two digits: nothing is read
        else:
            parts = _split(w, box)
        frames += [_mnist_frame(p) for p in parts]
        owner += [k] * len(parts)
    digits: list[list[int]] = [[] for _ in images]
    for k, d in zip(owner, _classify(frames, _get_classifier(classifier) if frames else None)):
        digits[k].append(int(d))
    return [Reading(b, c, p, tuple(d), o) for (b, c, p, o), d in zip(seen, digits)]


# ---- scoring ------------------------------------------------------------------------------------------------
def _check_images(images, name: str) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name} must be a numpy array uint8 (N, {SIZE}, {SIZE}, 3), got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (N, {SIZE}, {SIZE}, 3) with values 0..255, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"{name} must have shape (N, {SIZE}, {SIZE}, 3) (RGB, channels last), got {images.shape}")
    return images


def _judge(asked: dict, seen: Reading) -> dict[str, bool]:
    correct = {"color": seen.color == asked["color"], "background": seen.background == asked["background"]}
    if asked["kind"] == "number":
        correct["number"] = seen.digits == tuple(asked["digits"])
    else:
        correct["digit"] = seen.digits == (asked["digit"],)
        correct["position"] = seen.position == asked["position"]
    correct["all"] = all(correct.values())
    return correct


def parse_prompts(prompts: list[str], parse) -> tuple[list[dict | None], list[int]]:
    """(each prompt's attributes by `parse`, None outside the grammar; the indices of the parsed ones)."""
    asked: list[dict | None] = []
    for p in prompts:
        try:
            asked.append(parse(p))
        except ValueError:
            asked.append(None)
    return asked, [k for k, a in enumerate(asked) if a is not None]


def score(images: np.ndarray, prompts: list[str], classifier=None) -> PromptReport:
    """Score uint8 (N, 32, 32, 3) images against the N prompts they were generated from.

    Prompts outside the color-digits grammar are counted in `unparsed` and scored on nothing.
    `classifier`: a DigitClassifier (default: `evaluate.digits.get_classifier()`).
    """
    images = _check_images(images, "images")
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    asked, parsed = parse_prompts(prompts, parse_caption)
    readings = read_images(images[parsed], [len(asked[k]["digits"]) for k in parsed], classifier)
    seen: dict[int, Reading] = dict(zip(parsed, readings))
    records = [SampleRecord(k, p, asked[k], seen.get(k), _judge(asked[k], seen[k]) if k in seen else {})
               for k, p in enumerate(prompts)]
    rates, counts = {}, {}
    for attr in ATTRIBUTES:
        marks = [r.correct[attr] for r in records if attr in r.correct]
        counts[attr] = len(marks)
        rates[attr] = float(np.mean(marks)) if marks else float("nan")
    return PromptReport(records, rates, counts, unparsed=len(prompts) - len(parsed), n=len(prompts))


def load_prompted_npz(path: str | os.PathLike, key: str, what: str) -> tuple[np.ndarray, list[str]]:
    """(data[key], prompts) of an .npz of samples and their `prompts` str (N,); ValueError naming the file and what
    is wrong (a missing key, an object array, lengths that differ). `what` describes data[key] for messages."""
    expected = f"`{key}` {what} and `prompts` str (N,)"
    with np.load(path, allow_pickle=False) as data:
        for k in (key, "prompts"):
            if k not in data.files:
                raise ValueError(f"{path}: no {k!r} array (found {sorted(data.files)}); expected {expected}")
        try:
            prompts = data["prompts"]
        except ValueError as e:  # an object array would need pickle
            raise ValueError(f"{path}: 'prompts' must be a str array (N,), e.g. np.array(list_of_str), "
                             f"not an object array ({e})") from None
        samples = data[key]
    if prompts.ndim != 1 or prompts.dtype.kind != "U":
        raise ValueError(f"{path}: 'prompts' must be a str array of shape (N,), got dtype {prompts.dtype}, "
                         f"shape {prompts.shape}")
    if len(prompts) != len(samples):
        raise ValueError(f"{path}: 'prompts' has shape {prompts.shape} but {key!r} holds {len(samples)}; "
                         f"expected {expected}")
    return samples, [str(p) for p in prompts]


def score_npz(path: str | os.PathLike, classifier=None) -> PromptReport:
    """Score an .npz holding `images` uint8 (N, 32, 32, 3) and `prompts` str (N,) (a numpy unicode array)."""
    images, prompts = load_prompted_npz(path, "images", f"uint8 (N, {SIZE}, {SIZE}, 3)")
    return score(_check_images(images, f"{path}: 'images'"), prompts, classifier)


# ---- held-out prompts and the real ceiling --------------------------------------------------------------------
def _held_out_items(n: int, seed: int, kind: str, world_seed: int) -> tuple[ColorDigitsDataset, list[int]]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    data = ColorDigitsDataset("val", seed=world_seed)
    order = np.random.default_rng(seed).permutation(len(data)).tolist()
    if kind in ("number", "digit"):
        order = [i for i in order if data.attributes(i)["kind"] == kind]
    if not 1 <= n <= len(order):
        raise ValueError(f"n must be in 1..{len(order)} (the validation items of kind {kind!r}), got {n}")
    return data, order[:n]


def held_out_prompts(n: int, seed: int = 0, kind: str = "canonical", world_seed: int = 0) -> list[tuple[str, dict]]:
    """n (prompt, attributes) pairs from the color-digits VALIDATION split (only its held-out MNIST digits).

    kind: "canonical" (canonical captions), "paraphrase" (each item's paraphrase, canonical for about half),
    "number" / "digit" (canonical captions of two-digit numbers / single digits only). `seed` picks and orders
    the items; `world_seed` is the world's data seed (the training run's data.seed). The attributes are the
    item's `attributes(i)` plus `item` (i).
    """
    data, items = _held_out_items(n, seed, kind, world_seed)
    return [(data.caption(i, paraphrase=kind == "paraphrase"), {**data.attributes(i), "item": i}) for i in items]


def real_reference(n: int, seed: int = 0, kind: str = "canonical", world_seed: int = 0,
                   classifier=None) -> PromptReport:
    """`score` of the real validation images of held_out_prompts(n, seed, kind, world_seed) against their own
    prompts: the ceiling of the checker, to print beside a model's figures."""
    data, items = _held_out_items(n, seed, kind, world_seed)
    images = np.stack([data.render(i)[0] for i in items])
    return score(images, [data.caption(i, paraphrase=kind == "paraphrase") for i in items], classifier)


def format_report(report: PromptReport, reference: PromptReport | None = None) -> str:
    """A text table: attribute | prompts | model [| real], rates in percent, then the unparsed count."""
    head = f"{'attribute':<11}{'prompts':>8}{'model':>9}" + (f"{'real':>9}" if reference is not None else "")
    lines = [head, "-" * len(head)]

    def pct(r: PromptReport, attr: str) -> str:
        return "-" if r.counts[attr] == 0 else f"{100 * r.rates[attr]:.1f}%"

    for attr in ATTRIBUTES:
        row = f"{attr:<11}{report.counts[attr]:>8}{pct(report, attr):>9}"
        lines.append(row + (f"{pct(reference, attr):>9}" if reference is not None else ""))
    lines.append(f"unparsed: {report.unparsed} of {report.n} prompts")
    return "\n".join(lines)
