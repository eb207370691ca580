"""Prompt following on the `moving-digits` world: the video counterpart of `evaluate.prompts`.

Generated clips (uint8 (T, 32, 32, 3), T >= 2) are scored against the prompts they were generated from. The
checker shares no code or weights with the generative model: a prompt is read with the world's
`moving_digits.parse_caption`, and every frame is read exactly as `evaluate.prompts` reads an image
(`read_images`: background, ink colour and digit; `ink_weights`: the per-pixel ink weight).

The ink's track: in every frame, the centre of mass (x, y) of the ink weight, weights below 0.1 (`BOX_INK`, the
weight that counts towards a glyph's box) set to zero, so faint background noise does not pull it to the canvas
centre; NaN for a frame with no ink. For the world's clips the weight is the stroke coverage, moved by whole
pixels, so the track moves exactly as the glyph does.

Per clip (unparsable prompts are counted as `unparsed` and left out of every figure):
- **digit_frames**: the share of frames whose digit reads as the asked digit (a rate over all frames).
- **same_digit**: every frame reads as one and the same digit (whichever it is; a rate over clips).
- **colors**: the share of frames with both the digit colour and the background colour right (over frames).
- **direction**: the motion read from the first 3 frames (`DIRECTION_FRAMES`; the world moves >= 2 steps of
  1-3 px in the captioned direction before any bounce, so frames 0-2 always show it): the net displacement
  c_2 - c_0 of the track; its dominant axis (the larger |component|) and that component's sign name the
  direction read (x: left/right; y, growing downwards: up/down), provided it is >= 1 px (`MIN_MOVE`), else none
  is read (a static clip moves in no direction). Right when the direction read is the asked one; a clip with no
  ink in one of those frames reads none. With T = 2 the one step is used.
- **all**: everything right at once: the asked digit in every frame, both colours in every frame, direction.
- **digit_by_frame**: per frame index k, the share of clips (with a frame k) whose frame k reads as the asked
  digit: where clips lose their digit (image-to-video keeps frame 0 by construction).

Motion figures (px; lower is smoother; means over the clips with ink in every frame, `tracked` in the counts):
- **smoothness**: the mean absolute second difference |c_{t+1} - 2 c_t + c_{t-1}| (Euclidean, px/frame^2) over
  the interior frames, leaving out those at a bounce. The motion axis is the track's (the axis with the larger
  total |step|). A bounce is a reversal of the step's sign on that axis (steps under 0.5 px have no sign, so a
  step that ends on the wall and stands still is inside the reversal) with the ink box within 3 px (the top
  speed) of a wall on that axis (ink is allowed in rows/columns 1-30) in one of the frames those steps span; the
  second differences that involve any step from the last one before the turn to the first one after it are
  left out (a reflected step is shorter than the others, so it bends the track on both of its sides). A bounce
  cut by the clip's end counts too: when the clip's last step is >= 0.5 px shorter than the one before it and
  the last frame's ink box is within 3 px of the wall the last moving step heads into, the second differences
  touching that step or a later one are left out (the world never
  starts mid-bounce, so nothing is excused at the start). A reversal away from the walls is jitter, never
  excused. The world's clips score 0 exactly; a clip whose second differences are all left out
  has no figure.
- **jitter**: the mean absolute step across the motion axis (px/frame): the world never moves across it, so
  its clips score 0 exactly; a generated digit that wobbles sideways scores above 0.
- per clip also `speed`: the median absolute step along the motion axis (px/frame; the world's is 1-3).

Image-to-video: `score_first_frame` gives the mean absolute error of frame 0 against the given first frame,
in 0-255 levels (12 means 12/255).

Public API: :func:`score_clips`, :func:`score_npz`, :func:`held_out_prompts`, :func:`real_reference`,
:func:`format_report`, :func:`read_clips`, :func:`score_first_frame`, :class:`ClipReport`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from patchflow.data.moving_digits import SPEEDS, MovingDigitsDataset, parse_caption
from patchflow.evaluate.prompts import (BOX_INK, Reading, ink_weights, load_prompted_npz, parse_prompts,
                                        read_images)

__all__ = ["score_clips", "score_npz", "held_out_prompts", "real_reference", "format_report", "read_clips",
           "score_first_frame", "ClipReport", "ClipRecord", "ClipReading", "FirstFrameScore", "RATES", "MOTION"]

RATES = ("digit_frames", "same_digit", "colors", "direction", "all")  # shares, in [0, 1]
MOTION = ("smoothness", "jitter")  # px/frame^2, px/frame: lower is better
SIZE = 32
DIRECTION_FRAMES = 3  # frames 0..2: the world's guaranteed steps in the captioned direction
MIN_MOVE = 1.0  # px of net displacement over those frames for any direction to be read
STILL = 0.5  # px/frame: a step shorter than this has no sign when looking for a bounce
WALL_REACH = float(max(SPEEDS))  # px from a wall within which a reversal counts as a bounce
LO, HI = 1, SIZE - 1  # ink lies in rows/columns LO..HI-1 (>= 1 px from the border)
_NAMES = {(0, -1): "left", (0, 1): "right", (1, -1): "up", (1, 1): "down"}  # (axis, sign) -> direction
_PER_FRAME = ("digit_frames", "colors")  # the rates counted over frames; the others over clips


@dataclass(frozen=True)
class ClipReading:
    """What the checker saw in one clip: `frames` the per-frame Readings (see `evaluate.prompts.Reading`),
    `track` float64 (T, 2) the ink's centre of mass (x, y) per frame (NaN without ink), `boxes` int (T, 4) each
    frame's ink box (x0, y0, x1, y1), ends exclusive, of weight >= BOX_INK (-1 without ink), `moved` the
    direction read from the first frames (None: none), `displacement` (dx, dy) over those frames (None without
    ink there), `smoothness` (px/frame^2), `jitter` and `speed` (px/frame) and `bounces` (frames where a bounce
    was excused); the motion figures are None unless every frame has ink."""

    frames: tuple[Reading, ...]
    track: np.ndarray
    boxes: np.ndarray
    moved: str | None
    displacement: tuple[float, float] | None
    smoothness: float | None
    jitter: float | None
    speed: float | None
    bounces: tuple[int, ...]

    @property
    def digits(self) -> tuple[int | None, ...]:
        """The digit read in each frame (None where none was read)."""
        return tuple(r.digits[0] if r.digits else None for r in self.frames)


@dataclass
class ClipRecord:
    """One prompt and its clip: `asked` is parse_caption(prompt) (None when unparsed), `seen` the ClipReading
    (None when unparsed); `correct` holds digit_frames and colors (shares of this clip's frames), same_digit,
    direction and all (bools)."""

    index: int
    prompt: str
    asked: dict | None
    seen: ClipReading | None
    correct: dict[str, float | bool] = field(default_factory=dict)


@dataclass
class ClipReport:
    """Per-clip records; `rates` per RATES (digit_frames and colors over all frames of the parsed clips, the
    others over clips; NaN when there are none), `motion` per MOTION (the mean over the `tracked` clips that have
    the figure, NaN when none do), `counts` (clips, frames, tracked, smoothness: the clips with a smoothness
    figure), `unparsed` prompts (in no figure), `n` clips in all."""

    records: list[ClipRecord]
    rates: dict[str, float]
    motion: dict[str, float]
    counts: dict[str, int]
    unparsed: int
    n: int
    digit_by_frame: list[float] = field(default_factory=list)  # frame k: share of the clips that have it

    def as_dict(self) -> dict:
        """The figures without the records (JSON-ready)."""
        return {"n": self.n, "unparsed": self.unparsed, "rates": dict(self.rates), "motion": dict(self.motion),
                "counts": dict(self.counts), "digit_by_frame": list(self.digit_by_frame)}


# ---- reading clips ---------------------------------------------------------------------------------------
def _check_clips(clips, name: str) -> list[np.ndarray]:
    """An array (N, T, 32, 32, 3) or a sequence of (T, 32, 32, 3) arrays (T may differ) -> list of arrays."""
    if isinstance(clips, torch.Tensor):
        clips = clips.detach().cpu().numpy()
    if isinstance(clips, np.ndarray):
        if clips.ndim != 5:
            raise ValueError(f"{name} must be uint8 (N, T, {SIZE}, {SIZE}, 3) (RGB, channels last), "
                             f"got shape {clips.shape}")
        clips = list(clips)
    out = []
    for k, c in enumerate(clips):
        if isinstance(c, torch.Tensor):
            c = c.detach().cpu().numpy()
        if not isinstance(c, np.ndarray) or c.dtype != np.uint8:
            raise ValueError(f"{name}[{k}] must be a uint8 numpy array (T, {SIZE}, {SIZE}, 3) with values 0..255, "
                             f"got {getattr(c, 'dtype', type(c).__name__)}")
        if c.ndim != 4 or c.shape[1:] != (SIZE, SIZE, 3) or c.shape[0] < 2:
            raise ValueError(f"{name}[{k}] must have shape (T, {SIZE}, {SIZE}, 3) with T >= 2 frames (RGB, channels "
                             f"last), got {c.shape}")
        out.append(c)
    return out


def _track(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 2) ink centre of mass per frame (NaN without ink), (T, 4) ink box per frame (-1 without ink)."""
    track = np.full((len(clip), 2), np.nan)
    boxes = np.full((len(clip), 4), -1, np.int64)
    for t, rgb in enumerate(clip):
        w = ink_weights(rgb)[2]
        w = np.where(w >= BOX_INK, w, 0.0)
        total = w.sum()
        if total <= 0:
            continue
        track[t] = w.sum(0) @ np.arange(SIZE) / total, w.sum(1) @ np.arange(SIZE) / total
        ys, xs = np.nonzero(w)
        boxes[t] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return track, boxes


def _direction(track: np.ndarray) -> tuple[str | None, tuple[float, float] | None]:
    """The direction read from the first DIRECTION_FRAMES frames (see the module docstring)."""
    last = min(DIRECTION_FRAMES, len(track)) - 1
    if np.isnan(track[[0, last]]).any():
        return None, None
    d = track[last] - track[0]
    axis = int(abs(d[1]) > abs(d[0]))
    if abs(d[axis]) < MIN_MOVE:
        return None, (float(d[0]), float(d[1]))
    return _NAMES[(axis, 1 if d[axis] > 0 else -1)], (float(d[0]), float(d[1]))


def _wall_gap(box: np.ndarray, axis: int, side: int) -> int:
    """px between a frame's ink box and the wall on `side` (-1: left/top, +1: right/bottom) of `axis`."""
    lo, hi = (box[0], box[2]) if axis == 0 else (box[1], box[3])
    return int(lo - LO if side < 0 else HI - hi)


def _near_wall(box: np.ndarray, axis: int) -> bool:
    return min(_wall_gap(box, axis, -1), _wall_gap(box, axis, 1)) <= WALL_REACH


def _motion(track: np.ndarray, boxes: np.ndarray) -> tuple[float | None, float | None, float | None, tuple]:
    """(smoothness, jitter, speed, bounce frames) of a track with ink in every frame (see the module docstring)."""
    if np.isnan(track).any():
        return None, None, None, ()
    steps = np.diff(track, axis=0)  # steps[k] = c_{k+1} - c_k, k = 0..T-2
    axis = int(np.abs(steps[:, 1]).sum() > np.abs(steps[:, 0]).sum())
    along, across = steps[:, axis], steps[:, 1 - axis]
    jitter, speed = float(np.abs(across).mean()), float(np.median(np.abs(along)))
    accel = np.linalg.norm(np.diff(steps, axis=0), axis=1)  # accel[k] = c_{k+2} - 2 c_{k+1} + c_k: steps k, k+1
    keep = np.ones(len(accel), bool)
    moving = [k for k in range(len(along)) if abs(along[k]) >= STILL]
    bounces = []
    for i, j in zip(moving, moving[1:]):  # consecutive signed steps i < j; the steps between them stand still
        if np.sign(along[i]) == np.sign(along[j]):
            continue
        if not any(_near_wall(boxes[t], axis) for t in range(i, j + 2)):  # frames i..j+1 hold steps i..j
            continue  # a reversal away from the walls: not a bounce
        bounces.append(i + 1)
        keep[max(i - 1, 0):j + 1] = False  # accel[k] involves steps k, k+1: every one touching steps i..j
    if moving:  # a bounce cut by the clip's end (the world never starts mid-bounce: the start is not excused)
        i = moving[-1]
        slowed = len(along) >= 2 and abs(along[-1]) <= abs(along[-2]) - STILL  # a reflected (or stalled) last step
        if slowed and _wall_gap(boxes[-1], axis, int(np.sign(along[i]))) <= WALL_REACH:  # ... into a wall
            bounces.append(len(track) - 1)
            keep[max(i - 1, 0):] = False  # every second difference touching the last move or a later step
    smoothness = float(accel[keep].mean()) if keep.any() else None
    return smoothness, jitter, speed, tuple(sorted(set(bounces)))


def read_clips(clips, classifier=None) -> list[ClipReading]:
    """Read clips: uint8 (N, T, 32, 32, 3), or a sequence of uint8 (T, 32, 32, 3) arrays (T >= 2, may differ).

    `classifier`: a DigitClassifier (default: `evaluate.digits.get_classifier()`, trained once and cached).
    """
    clips = _check_clips(clips, "clips")
    if not clips:
        return []
    frames = np.concatenate(clips)
    readings = read_images(frames, [1] * len(frames), classifier)
    out, start = [], 0
    for clip in clips:
        seen = tuple(readings[start:start + len(clip)])
        start += len(clip)
        track, boxes = _track(clip)
        moved, displacement = _direction(track)
        smoothness, jitter, speed, bounces = _motion(track, boxes)
        out.append(ClipReading(seen, track, boxes, moved, displacement, smoothness, jitter, speed, bounces))
    return out


# ---- scoring ------------------------------------------------------------------------------------------------
def _judge(asked: dict, seen: ClipReading) -> dict[str, float | bool]:
    digit_ok = [r.digits == (asked["digit"],) for r in seen.frames]
    colors_ok = [r.color == asked["color"] and r.background == asked["background"] for r in seen.frames]
    digits = seen.digits
    correct = {"digit_frames": float(np.mean(digit_ok)), "same_digit": digits[0] is not None and len(set(digits)) == 1,
               "colors": float(np.mean(colors_ok)), "direction": seen.moved == asked["direction"]}
    correct["all"] = all(digit_ok) and all(colors_ok) and correct["direction"]
    return correct


def score_clips(clips, prompts, classifier=None) -> ClipReport:
    """Score clips (uint8 (N, T, 32, 32, 3), or N uint8 (T, 32, 32, 3) arrays) against the N prompts they were
    generated from. Prompts outside the moving-digits grammar are counted in `unparsed` and scored on nothing.
    `classifier`: a DigitClassifier (default: `evaluate.digits.get_classifier()`).
    """
    clips = _check_clips(clips, "clips")
    prompts = [str(p) for p in prompts]
    if len(prompts) != len(clips):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts; give one prompt per clip")
    asked, parsed = parse_prompts(prompts, parse_caption)
    seen = dict(zip(parsed, read_clips([clips[k] for k in parsed], classifier) if parsed else []))
    records = [ClipRecord(k, p, asked[k], seen.get(k), _judge(asked[k], seen[k]) if k in seen else {})
               for k, p in enumerate(prompts)]
    done = [r for r in records if r.seen is not None]
    frames = [len(r.seen.frames) for r in done]
    rates = {}
    for attr in RATES:
        marks = [float(r.correct[attr]) for r in done]
        if attr in _PER_FRAME:  # a share of all frames: weigh each clip by its frame count
            rates[attr] = float(np.dot(marks, frames) / sum(frames)) if frames else float("nan")
        else:
            rates[attr] = float(np.mean(marks)) if marks else float("nan")
    motion = {}
    for m in MOTION:
        values = [getattr(r.seen, m) for r in done if getattr(r.seen, m) is not None]
        motion[m] = float(np.mean(values)) if values else float("nan")
    counts = {"clips": len(done), "frames": int(sum(frames)),
              "tracked": sum(r.seen.jitter is not None for r in done),
              "smoothness": sum(r.seen.smoothness is not None for r in done)}
    digit_by_frame = []
    for k in range(max(frames, default=0)):
        marks = [r.seen.digits[k] == r.asked["digit"] for r in done if len(r.seen.frames) > k]
        digit_by_frame.append(float(np.mean(marks)))
    return ClipReport(records, rates, motion, counts, unparsed=len(prompts) - len(parsed), n=len(prompts),
                      digit_by_frame=digit_by_frame)


def score_npz(path: str | os.PathLike, classifier=None) -> ClipReport:
    """Score an .npz holding `videos` uint8 (N, T, 32, 32, 3) and `prompts` str (N,) (a numpy unicode array), as
    `patchflow sample --prompts-file ... --out clips.npz` writes it."""
    videos, prompts = load_prompted_npz(path, "videos", f"uint8 (N, T, {SIZE}, {SIZE}, 3)")
    if videos.dtype != np.uint8 or videos.ndim != 5:
        raise ValueError(f"{path}: 'videos' must be uint8 (N, T, {SIZE}, {SIZE}, 3), got dtype {videos.dtype}, "
                         f"shape {videos.shape}")
    return score_clips(_check_clips(videos, f"{path}: 'videos'"), prompts, classifier)


# ---- image to video -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FirstFrameScore:
    """How well clips keep the first frame they were given: `mean` and `per_clip` mean absolute error of frame 0,
    in 0-255 levels (12.0 means 12/255)."""

    mean: float
    per_clip: np.ndarray


def score_first_frame(clips, first_frames) -> FirstFrameScore:
    """Mean absolute error of each clip's frame 0 against its given first frame (uint8 (N, 32, 32, 3), or N
    (32, 32, 3) arrays), per clip and over all clips, in 0-255 levels."""
    clips = _check_clips(clips, "clips")
    if isinstance(first_frames, torch.Tensor):
        first_frames = first_frames.detach().cpu().numpy()
    first = np.asarray(first_frames)
    if first.dtype != np.uint8 or first.shape != (len(clips), SIZE, SIZE, 3):
        raise ValueError(f"first_frames must be uint8 ({len(clips)}, {SIZE}, {SIZE}, 3) (one per clip), got "
                         f"dtype {first.dtype}, shape {first.shape}")
    per_clip = np.array([np.abs(c[0].astype(np.float64) - f).mean() for c, f in zip(clips, first)])
    return FirstFrameScore(float(per_clip.mean()) if len(per_clip) else float("nan"), per_clip)


# ---- held-out prompts and the real ceiling --------------------------------------------------------------------
def _held_out_items(n: int, seed: int, frames: int, world_seed: int) -> tuple[MovingDigitsDataset, list[int]]:
    data = MovingDigitsDataset("val", seed=world_seed, frames=frames)
    if not 1 <= n <= len(data):
        raise ValueError(f"n must be in 1..{len(data)} (the moving-digits validation clips), got {n}")
    return data, np.random.default_rng(seed).permutation(len(data))[:n].tolist()


def held_out_prompts(n: int, seed: int = 0, frames: int = 9, world_seed: int = 0) -> list[tuple[str, dict]]:
    """n (canonical caption, attributes) pairs of moving-digits VALIDATION clips (only held-out MNIST digits).

    `seed` picks and orders the clips; `frames` is the clip length the attributes describe; `world_seed` is the
    world's data seed (the training run's data.seed). The attributes are the clip's `attributes(i)` plus `item`.
    """
    data, items = _held_out_items(n, seed, frames, world_seed)
    return [(data.caption(i), {**data.attributes(i), "item": i}) for i in items]


def real_reference(n: int, frames: int = 9, seed: int = 0, world_seed: int = 0, classifier=None) -> ClipReport:
    """`score_clips` of the real validation clips of held_out_prompts(n, seed, frames, world_seed) against their
    own captions: the ceiling of the checker, to print beside a model's figures."""
    data, items = _held_out_items(n, seed, frames, world_seed)
    return score_clips(np.stack([data.render(i)[0] for i in items]), [data.caption(i) for i in items], classifier)


def format_report(report: ClipReport, real: ClipReport | None = None) -> str:
    """A markdown table: figure | over | generated [| real]; rates in percent, motion in px; then the unparsed
    count."""
    head = "| figure | over | generated |" + (" real |" if real is not None else "")
    lines = [head, "|---|---|---|" + ("---|" if real is not None else "")]

    def pct(r: ClipReport, attr: str) -> str:
        return "-" if np.isnan(r.rates[attr]) else f"{100 * r.rates[attr]:.1f}%"

    def px(r: ClipReport, m: str) -> str:
        return "-" if np.isnan(r.motion[m]) else f"{r.motion[m]:.3f}"

    for attr in RATES:
        over = f"{report.counts['frames']} frames" if attr in _PER_FRAME else f"{report.counts['clips']} clips"
        lines.append(f"| {attr} | {over} | {pct(report, attr)} |"
                     + (f" {pct(real, attr)} |" if real is not None else ""))
    units = {"smoothness": "px/frame²", "jitter": "px/frame"}
    for m in MOTION:
        over = f"{report.counts['smoothness' if m == 'smoothness' else 'tracked']} clips"
        lines.append(f"| {m} ({units[m]}, lower is better) | {over} | {px(report, m)} |"
                     + (f" {px(real, m)} |" if real is not None else ""))
    lines.append("")
    if report.digit_by_frame:  # where a clip loses its digit (image-to-video: right after the given frame)
        lines.append("digit by frame: " + " ".join(f"{100 * v:.0f}%" for v in report.digit_by_frame))
    lines.append(f"unparsed: {report.unparsed} of {report.n} prompts")
    return "\n".join(lines)
