"""The picture of a moving-digits run's clips in the docs: one clip per row, its frames left to right.

    python bench/video_frames.py RUN OUT.png [--t2v 6] [--i2v 3] [--seed 0] [--scale 1]

Rows: the first `--t2v` prompts of the demo grid (`patchflow.train.demo.demo_video_prompts`) as text-to-video, then
`--i2v` image-to-video clips started from real held-out first frames (the validation clips `patchflow eval` uses,
their canonical captions). 8 frames each, the run's sampling settings.
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from patchflow.train.demo import demo_video_prompts
from patchflow.evaluate.video_run import _held_out
from patchflow.pipeline import Pipeline, grid

FRAMES = 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--t2v", type=int, default=6)
    p.add_argument("--i2v", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=1, help="integer upscale of the picture (nearest)")
    args = p.parse_args()
    pipe = Pipeline.load(args.run, device="cpu")
    rows = [pipe(prompt=demo_video_prompts()[:args.t2v], frames=FRAMES, seed=args.seed)]
    if args.i2v:
        prompts, items, data = _held_out(pipe, args.i2v, seed=1, frames=FRAMES)
        firsts = np.stack([data.render(i)[0][0] for i in items])  # (N, 32, 32, 3)
        rows.append(pipe(prompt=prompts, first_frame=firsts, frames=FRAMES, seed=args.seed))
    clips = np.concatenate(rows)  # (N, T, H, W, 3)
    picture = grid(clips.reshape(-1, *clips.shape[2:]), nrow=FRAMES)
    Image.fromarray(picture).resize((picture.shape[1] * args.scale, picture.shape[0] * args.scale),
                                    Image.NEAREST).save(args.out)
    print(f"{len(clips)} clips of {FRAMES} frames -> {args.out}")


if __name__ == "__main__":
    main()
