"""How much a moving-digits video run uses a given first frame: the velocity error per frame with and without it.

    python bench/context_probe.py RUN [RUN ...] [--clips 64] [--sigmas 0.3 0.5 0.7 0.9] [--seed 1]

RUN: a moving-digits VideoDiT run. For real held-out 8-frame clips (the set `patchflow eval` scores) it noises every
frame to one noise level sigma and prints, per frame, the model's mean squared velocity error (bf16, as sampling
runs) twice: with no frame given (`none`), and with frame 0 given clean at time 0, as image-to-video samples
(`given0`; frame 0's own error is then meaningless and not printed). A model that carries the glyph from the given
frame to the next has a much lower frame-1 error with it; equal errors mean the given frame is not used.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from patchflow.conditioning import build_conditioning
from patchflow.evaluate.video_run import _held_out
from patchflow.pipeline import Pipeline


@torch.no_grad()
def probe(run: str, clips: int, sigmas: list[float], seed: int, frames: int = 8) -> dict:
    pipe = Pipeline.load(run, device="cpu")
    texts, items, data = _held_out(pipe, clips, seed, frames)  # the set `patchflow eval` scores
    x0 = pipe._encode(np.stack([data.render(i)[0][:frames] for i in items])).float()  # (N, C, T, h, w), as sampling
    cond, _ = build_conditioning(pipe.cfg, "cpu").pair(texts)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = {"run": run}
    for sigma in sigmas:
        for name, given in (("none", 0), ("given0", 1)):
            tf = torch.full((x0.shape[0], x0.shape[2]), sigma)  # (N, T): one noise level per frame
            tf[:, :given] = 0.0
            w = tf[:, None, :, None, None]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                v = pipe.model((1 - w) * x0 + w * noise, tf * 1000, **cond).float()
            err = (v - (noise - x0)).pow(2).mean(dim=(0, 1, 3, 4))[given:]
            out[f"{name} {sigma}"] = [round(float(e), 4) for e in err]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--clips", type=int, default=64, help="held-out clips")
    ap.add_argument("--sigmas", type=float, nargs="*", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for run in args.runs:
        print(json.dumps(probe(run, args.clips, args.sigmas, args.seed)), flush=True)


if __name__ == "__main__":
    main()
