"""Training step time with a cache and without one: latents (codec.cache) or text embeddings (text.cache).

    python bench/latent_step.py [--config digits-latent] [--steps 40] [--threads 2]
    python bench/latent_step.py --cache text [--config color-digits]

Both trainers are built from the same config (the codec preset is trained first if it is not cached), differ only
in the cache setting ("auto" vs "off": every batch encoded by the codec, or every batch of captions by the text
encoder, inside the step), and are timed step by step, interleaved, after a warm-up; the median step time and
images/s are printed. Run on an idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from patchflow.config import load_config
from patchflow.data import ResumableBatchSampler
from patchflow.train.run import build_trainer
from patchflow.train.trainer import Trainer


def batches(trainer: Trainer):
    t = trainer.cfg.train
    sampler = ResumableBatchSampler(len(trainer.dataset), t.batch_size, seed=t.seed)
    loader = torch.utils.data.DataLoader(trainer.dataset, batch_sampler=sampler)
    return iter(loader)


def median_step_times(trainers: dict[str, Trainer], warmup: int, steps: int) -> dict[str, float]:
    """{name: median seconds of a training step}, each trainer warmed up, then timed step by step, interleaved
    with the others so that drifts of the machine fall on all of them alike."""
    runs = {name: (trainer, batches(trainer), []) for name, trainer in trainers.items()}
    for trainer, it, _ in runs.values():
        for _ in range(warmup):
            trainer.train_step(it)
    for _ in range(steps):
        for trainer, it, times in runs.values():
            t0 = time.perf_counter()
            trainer.train_step(it)
            times.append(time.perf_counter() - t0)
    return {name: statistics.median(times) for name, (_, _, times) in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", choices=["latents", "text"], default="latents", help="which cache to switch")
    p.add_argument("--config", help="default: digits-latent (latents), color-digits (text)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    key = "codec.cache" if args.cache == "latents" else "text.cache"
    config = args.config or ("digits-latent" if args.cache == "latents" else "color-digits")
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache in ((f"cached {args.cache}", "auto"), ("encode every step", "off")):
            cfg = load_config(config, [f"{key}=\"{cache}\"", "train.sample_every=0",
                                       f"train.num_threads={args.threads}"])
            trainers[name] = build_trainer(cfg, f"{tmp}/{cache}", progress=False)  # a codec preset trained first
        medians = median_step_times(trainers, args.warmup, args.steps)
    batch = next(iter(trainers.values())).cfg.train.batch_size
    base = None
    for name, trainer in trainers.items():
        med = medians[name]
        base = base or med
        print(f"{name:18s} {key} = {trainer.cfg.text.cache if args.cache == 'text' else trainer.cfg.codec.cache:4s}"
              f"  median step {1000 * med:7.1f} ms  "
              f"{batch / med:7.1f} images/s  ({med / base:.2f}x the cached step)")


if __name__ == "__main__":
    main()
