"""Edits of a color-digits run, scored (patchflow/evaluate/edits.py): recolouring real held-out images by prompt
at each --strength, and inpainting another digit where each image's digit was.

    python bench/edits.py runs/color-digits --n 200 --strengths 0.5 0.6 0.7 0.8 --out edits.json --grid edits.png

Prints one line per strength (new colour, digit kept, background kept, position kept) and the inpainting rates
with the mean absolute error (0..255) of the pixels outside the mask against the input's codec round trip.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from patchflow.evaluate.edits import inpaint, recolour
from patchflow.media.grids import save_grid
from patchflow.pipeline import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=200, help="held-out images per test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.7])
    ap.add_argument("--steps", type=int, help="sampling steps (default the run's sample.steps)")
    ap.add_argument("--out", type=Path, help="a JSON file of the figures")
    ap.add_argument("--grid", type=Path, help="a picture: inputs, then recoloured (last strength), then inpainted")
    args = ap.parse_args()
    pipe = Pipeline.load(args.run, device="cpu")
    result = {"run": str(args.run), "n": args.n, "seed": args.seed, "recolour": [], "inpaint": None}
    for s in args.strengths:
        t0 = time.perf_counter()
        r = recolour(pipe, args.n, args.seed, strength=s, steps=args.steps)
        rates = r["rates"]
        print(f"recolour at strength {s:.2f}: new colour {100 * rates['color']:.1f}%, digit kept "
              f"{100 * rates['digit']:.1f}%, background {100 * rates['background']:.1f}%, position "
              f"{100 * rates['position']:.1f}%, shape kept (ink IoU) {r['shape_kept']:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        result["recolour"].append({"strength": s, "rates": rates, "shape_kept": r["shape_kept"]})
    t0 = time.perf_counter()
    p = inpaint(pipe, args.n, args.seed, steps=args.steps)
    rates = p["rates"]
    print(f"inpaint: asked digit {100 * rates['digit']:.1f}%, colour {100 * rates['color']:.1f}%, background "
          f"{100 * rates['background']:.1f}%, position {100 * rates['position']:.1f}%; outside the mask "
          f"{p['outside_error']:.2f}/255 from the round trip; {100 * p['masked_share']:.0f}% of pixels masked "
          f"({time.perf_counter() - t0:.0f} s)")
    result["inpaint"] = {k: p[k] for k in ("rates", "outside_error", "masked_share", "margin")}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.grid:
        k = 8
        masked = np.where(p["masks"][:k, ..., None] > 0, 128, p["inputs"][:k]).astype(np.uint8)
        rows = [r["inputs"][:k], r["samples"][:k], masked, p["samples"][:k]]
        save_grid(np.concatenate(rows), args.grid, nrow=k)


if __name__ == "__main__":
    main()
