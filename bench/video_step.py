"""VideoDiT training-step speed: full vs factorized attention, and packing vs padding vs buckets on a mixed batch.

    python bench/video_step.py attention [--batch 32] [--steps 8] [--threads 2]
    python bench/video_step.py packing [--steps 8] [--threads 2]
    python bench/video_step.py inputs [--batch 32] [--steps 8] [--threads 2]

Shapes are the moving-digits preset's: latents (8, T, 8, 8), patch 1x2x2, hidden 256, depth 6, 14 prompt tokens,
bf16 autocast, AdamW. Each mode runs in its own fresh process (so peak memory is that mode's alone), warms up for
2 steps, then times `--steps` forward+backward+update steps; the median is printed.

`attention`: full spacetime attention vs factorized (per-frame joint attention + temporal blocks) on batches of
8-frame clips: ms/step and clips/s.

`packing`: one mixed batch of 8 clips of 8 frames, 8 clips of 4 frames and 32 images (one-frame clips), 2,048 real
image tokens in all. "packed": one sequence with a block-diagonal mask (VideoDiT's list input); "padded": every item
zero-padded to 8 frames in one dense batch (the compute a padding trainer spends; 6,144 tokens); "buckets": three
dense batches, one per size (Open-Sora's buckets: no waste, three small steps). Reported: real tokens/s and peak RSS.

`inputs`: what the model sees for one moving-digits clip: per-frame latents of codec-color-digits (8 x 8x8x8,
patch 1x2x2: 128 tokens), the causal codec-moving-digits latents of a 9-frame clip (5 x 8x8x8: 80 tokens), or
pixels (8 x 32x32x3, patch 1x4x4: 512 tokens); ms/step and clips/s at the same model width and depth.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from patchflow.models.text_config import VideoDiTConfig
from patchflow.models.video import VideoDiT

TEXT = 14


INPUTS = {"per-frame": dict(input_size=8, frames=8, in_channels=8, patch_size=2),  # (C, T, H, W) = (8, 8, 8, 8)
          "causal": dict(input_size=8, frames=5, in_channels=8, patch_size=2),
          "pixels": dict(input_size=32, frames=8, in_channels=3, patch_size=4)}


def model(attention: str, inputs: str = "per-frame") -> VideoDiT:
    return VideoDiT(VideoDiTConfig(**INPUTS[inputs], hidden_size=256, depth=6, num_heads=4, text_dim=384,
                                   pooled_dim=384, attention=attention))


def timed(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_mode(mode: str, args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net = model("factorized" if mode == "factorized" else "full", mode if mode in INPUTS else "per-frame")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    if mode in ("full", "factorized", *INPUTS):
        b, c = args.batch, net.config
        x, t = torch.randn(b, c.in_channels, c.frames, c.input_size, c.input_size), torch.rand(b) * 1000
        text, pooled = torch.randn(b, TEXT, 384), torch.randn(b, 384)

        def step():
            with autocast:
                out = net(x, t, text, pooled)
            update(out.float().pow(2).mean())

        seconds = timed(step, args.steps)
        return {"mode": mode, "ms_per_step": 1000 * seconds, "clips_per_s": b / seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    sizes = [8] * 8 + [4] * 8 + [1] * 32  # frames of the mixed batch's items
    items = [torch.randn(8, f, 8, 8) for f in sizes]
    text, pooled = torch.randn(len(sizes), TEXT, 384), torch.randn(len(sizes), 384)
    t = torch.rand(len(sizes)) * 1000
    real = sum(f * 16 for f in sizes)
    if mode == "packed":
        def step():
            with autocast:
                out = net(items, t, text, pooled)
            update(sum(o.float().pow(2).mean() for o in out))
    elif mode == "padded":
        x = torch.stack([torch.nn.functional.pad(v, (0, 0, 0, 0, 0, 8 - v.shape[1])) for v in items])

        def step():
            with autocast:
                out = net(x, t, text, pooled)
            update(out.float().pow(2).mean())
    else:  # buckets: one dense batch per size, one optimizer step over the three
        groups = {f: [i for i, g in enumerate(sizes) if g == f] for f in sorted(set(sizes))}

        def step():
            loss = 0
            for f, idx in groups.items():
                with autocast:
                    out = net(torch.stack([items[i] for i in idx]), t[idx], text[idx], pooled[idx])
                loss = loss + out.float().pow(2).mean()
            update(loss)
    seconds = timed(step, args.steps)
    return {"mode": mode, "ms_per_step": 1000 * seconds, "real_tokens_per_s": real / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["attention", "packing", "inputs"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    modes = {"attention": ("full", "factorized"), "packing": ("packed", "padded", "buckets"),
             "inputs": tuple(INPUTS)}[args.what]
    for mode in modes:
        cmd = [sys.executable, __file__, args.what, "--mode", mode, "--batch", str(args.batch), "--steps",
               str(args.steps), "--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        figures = ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "mode")
        print(f"{mode:>10}: {figures}")


if __name__ == "__main__":
    main()
