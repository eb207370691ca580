"""Whole-pipeline sampling speed: patchflow's `Pipeline` beside diffusers' `DiTPipeline`, same model shape.

Each call goes from class labels to finished images, the way a user calls it: noise, 20 steps of
classifier-free guidance (scale 4, cond + uncond in one doubled batch on both sides), then images as arrays.
  patchflow: `patchflow.Pipeline(model, cfg)(labels, steps=20, guidance=4, seed=i)`: Euler on the rectified
             flow, uint8 (B, H, W, C).
  diffusers: `DiTPipeline(transformer, vae, DDIMScheduler())(labels, num_inference_steps=20, guidance_scale=4,
             output_type="np")`: float (B, H, W, C).
Both models are pixel-space here, so diffusers gets an identity "VAE" (decode returns its input, scaling
factor 1); neither side pays for a decoder. DiTPipeline's null class is hard-coded to 1000, so every
config has 1000 classes. Weights are random: speed does not depend on them.

Precision is per side: patchflow bf16 is `sample.precision = "bf16"` (autocast; the sampler state stays
fp32); diffusers bf16 is the transformer in bfloat16 (`torch_dtype=torch.bfloat16`, its usual way).
The two pipelines alternate window by window; each figure is the median of the windows.

    python bench/sample_pipeline.py                                        # Mini/4 @ 8, 32; fp32 vs fp32
    python bench/sample_pipeline.py --precision bf16 --diffusers-precision fp32
    python bench/sample_pipeline.py --config s2 --batch 8 --windows 3
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from patchflow.config import RunConfig, SampleConfig
from patchflow.models.dit import DiT
from patchflow.pipeline import Pipeline
from train_throughput import CONFIGS, GUIDANCE, SAMPLE_STEPS, Timing, add_common_args, apply_common_args, \
    build_diffusers, interleaved_rates, patchflow_config

NUM_CLASSES = 1000  # DiTPipeline appends class 1000 as its null label


class IdentityDecoder(torch.nn.Module):
    """Stands in for DiTPipeline's VAE on a pixel-space model: decode(x).sample is x."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # gives the module a device

    @property
    def device(self) -> torch.device:  # diffusers asks every component for its device
        return self.anchor.device

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=latents)


@dataclass
class Row:
    config: str
    batch: int
    patchflow: float     # images/s, whole 20-step pipeline call
    diffusers: float

    @property
    def ratio(self) -> float:
        return self.patchflow / self.diffusers


def build_pipelines(name: str, pf_precision: str, df_precision: str):
    from diffusers import DDIMScheduler, DiTPipeline

    preset, size, channels, _, _ = CONFIGS[name]
    model_cfg = patchflow_config(preset, size, channels, NUM_CLASSES)
    torch.manual_seed(0)
    cfg = RunConfig(model=model_cfg, sample=SampleConfig(steps=SAMPLE_STEPS, guidance=GUIDANCE,
                                                         precision=pf_precision))
    pf = Pipeline(DiT(model_cfg).eval(), cfg)
    transformer = build_diffusers(model_cfg).model.eval()
    if df_precision == "bf16":
        transformer = transformer.to(torch.bfloat16)
    df = DiTPipeline(transformer=transformer, vae=IdentityDecoder(), scheduler=DDIMScheduler())
    df.set_progress_bar_config(disable=True)
    return pf, df


def bench(name: str, batch: int, pf, df, timing: Timing) -> Row:
    labels = [i % NUM_CLASSES for i in range(batch)]
    seed = iter(range(10**9))
    calls = {
        "patchflow": lambda: pf(labels, steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=next(seed)),
        "diffusers": lambda: df(class_labels=labels, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                                generator=torch.Generator().manual_seed(next(seed)), output_type="np").images,
    }
    shapes = {k: tuple(fn().shape) for k, fn in calls.items()}  # both give (B, H, W, C) arrays
    if shapes["patchflow"] != shapes["diffusers"]:
        raise RuntimeError(f"the pipelines disagree on the output shape: {shapes}")
    rates = interleaved_rates(calls, batch, timing)
    return Row(name, batch, statistics.median(rates["patchflow"]), statistics.median(rates["diffusers"]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["mini"])
    p.add_argument("--batch", nargs="+", type=int, default=[8, 32])
    add_common_args(p, warmup=1, windows=5)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_common_args(args)
    import diffusers

    timing = Timing(args.warmup, args.windows, args.min_window)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads; "
          f"patchflow {args.precision}, diffusers {args.diffusers_precision}; {SAMPLE_STEPS} steps, guidance "
          f"{GUIDANCE}; median of {timing.windows} interleaved windows of >= {timing.min_window_s:g}s")
    print(f"{'config':8}{'batch':>6}{'patchflow img/s':>18}{'DiTPipeline img/s':>20}{'ratio pf/df':>13}")
    rows = []
    for name in args.config:
        pf, df = build_pipelines(name, args.precision, args.diffusers_precision)
        for batch in args.batch:
            r = bench(name, batch, pf, df, timing)
            rows.append(r)
            print(f"{r.config:8}{r.batch:>6}{r.patchflow:>18.3f}{r.diffusers:>20.3f}{r.ratio:>13.3f}", flush=True)
    if args.json:
        env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "precision": {"patchflow": args.precision,
                                                                 "diffusers": args.diffusers_precision}}
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [{**vars(r), "ratio": r.ratio} for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
