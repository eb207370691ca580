"""DiT-XL/2 on one GPU: bf16 training throughput and MFU, and 50-step guided sampling latency.

    python bench/gpu_bench.py                      # on a GPU (what bench/gpu.sh runs)
    python bench/gpu_bench.py --device cpu --tiny  # smoke test of the script itself

MFU = 3 x forward FLOPs (DiT convention, patchflow.flops) x images/s / measured bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from patchflow.flops import dit_forward_macs, measure_matmul_peak, mfu
from patchflow.flow.guidance import classifier_free
from patchflow.flow.objective import RectifiedFlowObjective
from patchflow.config import FlowConfig
from patchflow.models.dit import DiT, DiTConfig
from patchflow.train.optim import adamw


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds per call after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="DiT-XL/2")
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="DiT-Micro/4, 2 iterations: checks the script runs")
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset = "DiT-Micro/4" if args.tiny else args.preset
    iters, warmup = (2, 1) if args.tiny else (10, 3)
    cfg = DiTConfig.from_preset(preset, input_size=32, in_channels=4, num_classes=1000, learn_sigma=False)
    model = DiT(cfg).to(device)
    model.checkpoint_every = args.checkpoint_every
    if args.compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    macs = dit_forward_macs(cfg)
    peak = measure_matmul_peak(torch.bfloat16, n=1024 if args.tiny else 8192, reps=3 if args.tiny else 10,
                               device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; model {preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), "
          f"{macs / 1e9:.1f} GMACs forward; measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    objective = RectifiedFlowObjective(FlowConfig())
    opt = adamw(model.parameters(), lr=1e-4)  # the trainer's optimizer (fused kernel)
    results = {"device": name, "preset": preset, "peak_bf16_flops": peak, "train": [], "compile": args.compile}
    for batch in args.batch if not args.tiny else [2]:
        x = torch.randn(batch, 4, 32, 32, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = objective.loss(lambda a, s: model(a, s, y), x).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = timed(step, device, warmup, iters)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rate = batch / sec
        row = {"batch": batch, "images_per_s": rate, "mfu": mfu(rate, macs, peak), "peak_memory_gib": mem}
        results["train"].append(row)
        print(f"train bf16 batch {batch}: {rate:.1f} img/s, MFU {100 * row['mfu']:.1f}%, peak memory {mem:.1f} GiB")
    model.eval()
    b = 2 if args.tiny else args.sample_batch
    y = torch.randint(0, 1000, (b,), device=device)
    fn = classifier_free(model, y, torch.full_like(y, 1000), 4.0)
    noise = torch.randn(b, 4, 32, 32, device=device)
    steps = 2 if args.tiny else 50

    @torch.inference_mode()
    def sample():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            objective.sample(fn, noise, steps)

    sec = timed(sample, device, 1, 2 if args.tiny else 5)
    results["sample"] = {"batch": b, "steps": steps, "seconds": sec}
    print(f"sampling: {steps} Euler steps with CFG 4 (one batched forward), batch {b}: {sec:.2f} s "
          f"({sec / steps * 1000:.1f} ms/step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
