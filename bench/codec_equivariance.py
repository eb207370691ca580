"""How shift-equivariant a codec is, and what it costs in reconstruction, on real held-out moving-digits frames.

    python bench/codec_equivariance.py CODEC [CODEC ...] [--clips 64] [--json out.json]

CODEC: a codec spec (`codec-color-digits` from the cache, a codec run or codec directory). For each it prints the
reconstruction PSNR (posterior mean, decoded), the share of reconstructed frames the clip checker reads as the
asked digit (the codec's ceiling for a generator's digits; the real frames' share beside it) and, for glyph moves
of 1-4 pixels (the codec's latent pixel is 4 pixels wide, so 1-3 are off the latent grid), the encoder's relative
equivariance error |encode(shift(x)) - shift(encode(x))|^2 / |encode(x)|^2, the quantity
`model.equivariance_weight` trains down (a fractional latent shift interpolates linearly, as in training). Frames
are the 8 frames of moving-digits validation clips, where a video model sees its glyphs move.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from patchflow import codecs
from patchflow.data.moving_digits import MovingDigitsDataset
from patchflow.evaluate.clips import score_clips
from patchflow.pipeline import to_uint8
from patchflow.train.codec_model import shift


def real_clips(n: int) -> tuple[np.ndarray, list[str]]:
    """n validation clips, uint8 (n, 8, 32, 32, 3), and their captions."""
    data = MovingDigitsDataset("val", frames=8)
    return np.stack([data.render(i)[0] for i in range(n)]), [data.caption(i) for i in range(n)]


@torch.no_grad()
def measure(spec: str, clips: np.ndarray, prompts: list[str]) -> dict:
    codec = codecs.load(spec)
    f = codec.space_factor
    x = torch.from_numpy(clips).float().div(127.5).sub(1).flatten(0, 1).permute(0, 3, 1, 2)[:, :, None]  # frames
    encode = lambda v: torch.cat([codec.encode_moments(b)[0] for b in v.split(64)])  # posterior means, in batches
    mean = encode(x)
    recon = torch.cat([codec.decode_raw(m).clamp(-1, 1) for m in mean.split(64)])
    mse = (recon - x).pow(2).mean().item() / 4  # the squared error of [0, 1] pixels
    pixels = to_uint8(recon).reshape(clips.shape)  # each frame a one-frame clip: (n * t, 1, H, W, 3) -> clips'
    out = {"codec": spec, "psnr_db": 10 * np.log10(1 / mse),
           "digit_frames": score_clips(pixels, prompts).rates["digit_frames"]}
    ref = mean.pow(2).mean()
    for px in range(1, 5):
        errs = []
        for dy, dx in ((0, px), (px, 0), (0, -px), (-px, 0)):
            errs.append(((encode(shift(x, dy, dx)) - shift(mean, dy / f, dx / f)).pow(2).mean() / ref).item())
        out[f"equivariance_{px}px"] = float(np.mean(errs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("codecs", nargs="+")
    ap.add_argument("--clips", type=int, default=64, help="validation clips (8 frames each)")
    ap.add_argument("--json")
    args = ap.parse_args()
    clips, prompts = real_clips(args.clips)
    print(f"real frames: the asked digit in {100 * score_clips(clips, prompts).rates['digit_frames']:.1f}%")
    rows = [measure(spec, clips, prompts) for spec in args.codecs]
    for r in rows:
        print(f"{r['codec']}: PSNR {r['psnr_db']:.2f} dB, the asked digit in {100 * r['digit_frames']:.1f}% of "
              f"frames; relative equivariance error "
              + ", ".join(f"{px} px {r[f'equivariance_{px}px']:.4f}" for px in range(1, 5)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
