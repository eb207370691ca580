"""How well a moving-digits run draws digits as stills: from noise, and from real frames partly noised (SDEdit).

    python bench/digit_probe.py RUN [RUN ...] [--prompts 200] [--sdedit 100] [--strengths 0.5 0.7] [--seed 0]

RUN: a moving-digits VideoDiT run (the image stage of `patchflow demo moving-digits`, or a video run). For each run
it prints, on held-out canonical prompts, the share of one-frame samples whose digit the clip checker reads as the
asked one (`still`), and for each strength s the same share after re-running the last fraction s of the run's
sampling schedule from the real held-out first frame of each prompt (`sdedit s`; 0 keeps the frame, 1 is a sample
from noise). The SDEdit figures separate a model's mid-noise denoising (where a glyph's shape is decided) from
its choice of a place and shape at pure noise, and move well before the from-noise rate leaves chance (about
10%), so short runs can be compared. Compare runs with the same flow.shift: a strength is a share of the shifted
schedule.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from patchflow.evaluate.clips import score_clips
from patchflow.evaluate.video_run import _held_out
from patchflow.pipeline import Pipeline


def digit_rate(stills: np.ndarray, prompts: list[str]) -> float:
    """stills: uint8 (N, 1, 32, 32, 3) -> share read as the asked digit (each still scored as a 2-frame clip)."""
    return score_clips(np.concatenate([stills, stills], axis=1), prompts).rates["digit_frames"]


def probe(run: str, prompts: int, sdedit: int, strengths: list[float], seed: int) -> dict:
    pipe = Pipeline.load(run, device="cpu")
    texts, items, data = _held_out(pipe, max(prompts, sdedit), seed, frames=8)  # the set `patchflow eval` scores
    out = {"run": run, "still": digit_rate(pipe(prompt=texts[:prompts], frames=1, seed=seed), texts[:prompts])}
    firsts = [data.render(i)[0][:1] for i in items[:sdedit]]  # (1, 32, 32, 3) each
    for s in strengths:
        stills = np.stack([pipe(prompt=p, video=f, strength=s, seed=seed)[0]  # a one-frame clip stays one frame
                           for p, f in zip(texts[:sdedit], firsts)])
        out[f"sdedit {s}"] = digit_rate(stills, texts[:sdedit])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--prompts", type=int, default=200, help="held-out prompts sampled from noise")
    ap.add_argument("--sdedit", type=int, default=100, help="held-out first frames re-noised")
    ap.add_argument("--strengths", type=float, nargs="*", default=[0.5, 0.7])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for run in args.runs:
        print(json.dumps(probe(run, args.prompts, args.sdedit, args.strengths, args.seed)), flush=True)


if __name__ == "__main__":
    main()
