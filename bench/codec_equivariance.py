"""How shift-equivariant a codec is, and what it costs in reconstruction, on real held-out moving-digits frames.

    python bench/codec_equivariance.py CODEC [CODEC ...] [--frames 512] [--json out.json]

CODEC: a codec spec (`codec-color-digits` from the cache, a codec run or codec directory). For each it prints the
reconstruction PSNR (posterior mean, decoded) and, for glyph moves of 1-4 pixels (the codec's latent pixel is 4
pixels wide, so 1-3 are off the latent grid), the encoder's relative equivariance error
|encode(shift(x)) - shift(encode(x))|^2 / |encode(x)|^2, the quantity `model.equivariance_weight` trains down
(a fractional latent shift interpolates linearly, as in training). Frames are moving-digits validation clips'
frames, where a video model sees its glyphs move.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from patchflow import codecs
from patchflow.data.moving_digits import MovingDigitsDataset
from patchflow.train.codec_model import shift


def frames(n: int) -> torch.Tensor:
    """n real frames (every 4th frame of validation clips): (n, 3, 1, 32, 32) in [-1, 1]."""
    data, out, i = MovingDigitsDataset("val", frames=9), [], 0
    while len(out) < n:
        out.extend(data.render(i)[0][::4])
        i += 1
    x = torch.from_numpy(np.stack(out[:n])).float().div(127.5).sub(1)
    return x.permute(0, 3, 1, 2)[:, :, None]


@torch.no_grad()
def measure(spec: str, x: torch.Tensor) -> dict:
    codec = codecs.load(spec)
    f = codec.space_factor
    mean = torch.cat([codec.encode_moments(b)[0] for b in x.split(64)])
    recon = torch.cat([codec.decode_raw(m).clamp(-1, 1) for m in mean.split(64)])
    mse = (recon - x).pow(2).mean().item() / 4  # the squared error of [0, 1] pixels
    out = {"codec": spec, "psnr_db": 10 * np.log10(1 / mse)}
    ref = mean.pow(2).mean()
    for px in range(1, 5):
        errs = []
        for dy, dx in ((0, px), (px, 0), (0, -px), (-px, 0)):
            moved = torch.cat([codec.encode_moments(b)[0] for b in shift(x, dy, dx).split(64)])
            errs.append(((moved - shift(mean, dy / f, dx / f)).pow(2).mean() / ref).item())
        out[f"equivariance_{px}px"] = float(np.mean(errs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("codecs", nargs="+")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = frames(args.frames)
    rows = [measure(spec, x) for spec in args.codecs]
    for r in rows:
        print(f"{r['codec']}: PSNR {r['psnr_db']:.2f} dB; relative equivariance error "
              + ", ".join(f"{px} px {r[f'equivariance_{px}px']:.4f}" for px in range(1, 5)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
