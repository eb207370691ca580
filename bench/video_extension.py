"""The loss of a video model before and after extending an image model, on fixed held-out clips.

    python bench/video_extension.py IMAGE_RUN VIDEO_RUN [--clips 256] [--threads 2]

IMAGE_RUN: a run whose weights start the video run (an image MMDiT, or a VideoDiT trained on one-frame clips, as
`patchflow demo moving-digits` does); VIDEO_RUN: a moving-digits VideoDiT run (its config and codec are used).
Prints the rectified-flow loss of text-to-video on `--clips` held-out 8-frame clips (validation split, their
canonical captions, fixed noise and timesteps, no caption dropout, no given frames) for: a freshly initialised
VideoDiT (what training from scratch starts at), the image weights loaded into the VideoDiT (before), and the video
run's EMA weights (after).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from patchflow import codecs
from patchflow.conditioning import build_conditioning
from patchflow.data.moving_digits import MovingDigitsDataset
from patchflow.data.worlds import to_tensor
from patchflow.flow.objective import RectifiedFlowObjective
from patchflow.models import build_model
from patchflow.models.video import load_image_weights
from patchflow.pipeline import load_run_config
from patchflow.run_dir import latest_checkpoint, load_weights


def ema_of(run: Path) -> dict:
    path = run / "ema.safetensors"
    return load_weights(path if path.is_file() else latest_checkpoint(run) / "ema.safetensors")


@torch.inference_mode()
def held_out_loss(model, cfg, latents, captions, conditioning) -> float:
    objective = RectifiedFlowObjective(cfg.flow)
    losses = []
    for i in range(0, len(latents), 64):
        cond = conditioning.pair(captions[i:i + 64])[0]
        g = torch.Generator().manual_seed(i)  # the same noise and timesteps for every model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective.loss(lambda x, t: model(x, t, **cond), latents[i:i + 64], g)
        losses.append(loss.float())
    return torch.cat(losses).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image_run", type=Path)
    p.add_argument("video_run", type=Path)
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.video_run)
    cfg.flow.context_prob = 0.0  # plain text-to-video loss
    codec = codecs.load(args.video_run)
    data = MovingDigitsDataset("val", seed=cfg.data.seed, frames=8)
    clips = torch.stack([to_tensor(data.render(i)[0]) for i in range(args.clips)])
    with torch.inference_mode():
        latents = torch.cat([codec.encode(clips[i:i + 64]) for i in range(0, len(clips), 64)])
    captions = [data.caption(i) for i in range(args.clips)]
    conditioning = build_conditioning(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    rows = [("fresh VideoDiT (from scratch)", held_out_loss(model, cfg, latents, captions, conditioning))]
    load_image_weights(model, ema_of(args.image_run))
    rows.append((f"image weights ({args.image_run})", held_out_loss(model, cfg, latents, captions, conditioning)))
    load_image_weights(model, ema_of(args.video_run))
    rows.append((f"video run ({args.video_run})", held_out_loss(model, cfg, latents, captions, conditioning)))
    for name, loss in rows:
        print(f"{loss:8.4f}  {name}")


if __name__ == "__main__":
    main()
