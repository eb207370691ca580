"""Where a moving-digits run loses the digit: each frame's digit rate against the ink's distance to the token grid.

    python bench/grid_offsets.py RUN [--prompts 200] [--seed 1] [--frames 8]

RUN: a moving-digits VideoDiT run. Text-to-video clips of held-out canonical prompts are read by the clip checker;
each frame with ink is binned by how far its ink's centre of mass lies from the nearest token corner (the larger of
the two axes' distances, in pixels; a token spans codec downsampling x model.patch_size pixels, 8 in the demo), and
the share of frames read as the asked digit is printed per bin, for all frames, for frames after the first, and for
frames after a first frame that was read right (does a right glyph survive the motion?). Real held-out clips are
binned the same way beside them, so a drop that is the checker's own shows up there too.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from patchflow.evaluate.clips import real_reference, score_clips
from patchflow.evaluate.video_run import _held_out
from patchflow.pipeline import Pipeline


def grid_distance(centre: np.ndarray, token: int) -> np.ndarray:
    """centre: (..., 2) ink centres (x, y) in pixel-index coordinates -> (...) largest per-axis distance to a token
    corner. Token edges lie at k * token - 0.5 (between pixels k * token - 1 and k * token)."""
    half = token / 2
    return np.abs((centre + 0.5 + half) % token - half).max(-1)


def frame_rows(report) -> np.ndarray:
    """Per frame with ink: (frame index, centre x, centre y, digit right, frame 0 right), float (N, 5)."""
    rows = []
    for rec in report.records:
        if rec.seen is None:
            continue
        digit = rec.asked["digit"]
        first_right = rec.seen.digits[0] == digit
        for k, reading in enumerate(rec.seen.frames):
            x, y = rec.seen.track[k]
            if not np.isnan(x):
                rows.append((k, x, y, reading.digits == (digit,), first_right))
    return np.array(rows, dtype=float).reshape(-1, 5)


def by_distance(rows: np.ndarray, token: int, bins: int = 4) -> list[dict]:
    """Digit rates per distance bin (bins of token / (2 * bins) px, from 0 to half a token)."""
    dist = grid_distance(rows[:, 1:3], token)
    edges = np.linspace(0, token / 2, bins + 1)
    edges[-1] += 1e-6
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (dist >= lo) & (dist < hi)
        later = m & (rows[:, 0] > 0)
        kept = later & (rows[:, 4] == 1)
        out.append({"px": f"{lo:g}-{min(hi, token / 2):g}", "frames": int(m.sum()),
                    "digit": float(rows[m, 3].mean()) if m.any() else float("nan"),
                    "digit_after_frame0": float(rows[later, 3].mean()) if later.any() else float("nan"),
                    "digit_after_right_frame0": float(rows[kept, 3].mean()) if kept.any() else float("nan")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args()
    pipe = Pipeline.load(args.run)
    model, data = pipe.cfg.model, pipe.cfg.data
    token = data.image_size // model.input_size * model.patch_size
    prompts, _, _ = _held_out(pipe, args.prompts, args.seed, args.frames)
    clips = pipe(prompt=prompts, frames=args.frames, seed=args.seed)
    generated = by_distance(frame_rows(score_clips(clips, prompts)), token)
    real = by_distance(frame_rows(real_reference(args.prompts, frames=args.frames, seed=args.seed,
                                                 world_seed=data.seed)), token)
    print(f"token: {token} px; {args.prompts} held-out prompts, seed {args.seed}, {args.frames} frames")
    print("| distance to the grid | frames | digit | after frame 0 | after a right frame 0 | real clips |")
    print("| --- | --- | --- | --- | --- | --- |")
    for g, r in zip(generated, real):
        print(f"| {g['px']} px | {g['frames']} | {g['digit']:.1%} | {g['digit_after_frame0']:.1%} | "
              f"{g['digit_after_right_frame0']:.1%} | {r['digit']:.1%} ({r['frames']}) |")
    print(json.dumps({"run": args.run, "token": token, "generated": generated, "real": real}))


if __name__ == "__main__":
    main()
