"""What REPA costs a training step, and the encoder pass its feature cache saves.

    python bench/repa_cost.py [--config digits] [--encoder world|DIR] [--steps 40] [--threads 2]

Two trainers from the same config (one size of item: not for bucketed clips), REPA off and on (`repa.encoder`;
its features computed once into the feature cache before the first step, as `patchflow train` does), timed step
by step, interleaved, after a warm-up (`latent_step.median_step_times`): the median step time of each and the
ratio (the issue's bar: at most 1.10x). Then the frozen encoder itself over one batch of the data's clean images
(the pass each step would make without the cache), its median time and its share of the REPA-off step.
`--encoder DIR` takes a transformers vision directory (DINOv2, SigLIP, CLIP) instead of the
world encoder. Run on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from patchflow.config import load_config
from patchflow.train.run import build_trainer
from patchflow.vision import load_vision_encoder
from patchflow.vision.world import training_images

from latent_step import median_step_times  # bench/, the script's own folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="digits")
    p.add_argument("--encoder", default="world", help='"world" or a transformers vision directory')
    p.add_argument("--steps", type=int, default=40, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common = ["train.sample_every=0", f"train.num_threads={args.threads}"]
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, encoder in (("REPA off", ""), ("REPA on (cached features)", args.encoder)):
            cfg = load_config(args.config, [*common, f"repa.encoder={json.dumps(encoder)}"])
            trainers[name] = build_trainer(cfg, f"{tmp}/{len(trainers)}", progress=False)
        medians = median_step_times(trainers, args.warmup, args.steps)
    base = medians["REPA off"]
    for name, med in medians.items():
        print(f"{name:28s} median step {1000 * med:7.1f} ms ({med / base:.3f}x)")

    cfg = trainers["REPA off"].cfg  # both sides read the same data
    encoder = load_vision_encoder(args.encoder, cfg.data, progress=False, world_steps=cfg.repa.world_steps).eval()
    images, _ = training_images(cfg.data, cfg.train.batch_size, seed=0)  # every frame of a clip is one image
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            encoder.features(images)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"encoder pass the cache saves  {encoder.name}, {len(images)} images: median {1000 * med:7.1f} ms "
          f"({med / base:.2f}x the REPA-off step)")


if __name__ == "__main__":
    main()
