"""torch.compile of the DiT blocks (`DiT.compile_blocks`, `train.compile = true`): what it costs and what it buys.

Measured for one config and precision, eager and compiled models with the same weights:
  compile time: wall time of the first compiled training step and of the first compiled sampling step,
                minus an eager step;
  recompiles:   graphs compiled (`torch._dynamo` unique_graphs) after each new input shape: the first
                shape, a new batch size, a new resolution and a new frame count; one compile should serve all;
  speed:        training and sampling images/s, eager and compiled interleaved window by window.

    python bench/compile_time.py --config mini --batch 8 --precision fp32
    python bench/compile_time.py --config s2 --batch 8 --precision bf16 --windows 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config
from torch._dynamo.utils import counters

from train_throughput import CONFIGS, SAMPLE_STEPS, Timing, build_patchflow, interleaved_rates, patchflow_config, \
    patchflow_sample_step_fn, train_step_fn


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="mini")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warm-cache", action="store_true",
                   help="let inductor reuse its on-disk caches (default: off, so the compile time is a cold start's)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--min-window", type=float, default=2.0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = not args.warm_cache
    preset, size, channels, classes, _ = CONFIGS[args.config]
    cfg = patchflow_config(preset, size, channels, classes)
    torch.manual_seed(0)
    eager = build_patchflow(cfg)
    compiled = build_patchflow(cfg)
    compiled.model.load_state_dict(eager.model.state_dict())
    compiled.model.compile_blocks(**({"mode": args.mode} if args.mode else {}))
    eager.precision = compiled.precision = args.precision

    def batch(b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, channels, s, s), torch.randint(0, classes, (b,))

    x0, y = batch(args.batch, size)
    steps = {"eager": train_step_fn(eager, x0, y), "compiled": train_step_fn(compiled, x0, y)}
    samples = {"eager": patchflow_sample_step_fn(eager, cfg, x0, y),
               "compiled": patchflow_sample_step_fn(compiled, cfg, x0, y)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {preset} on {channels}x{size}x{size}, "
          f"batch {args.batch}, {args.precision}, compile mode {args.mode or 'default'}, "
          f"{'warm' if args.warm_cache else 'cold'} inductor cache")

    torch._dynamo.reset()
    counters.clear()
    eager_train = min(timed(steps["eager"]) for _ in range(2))
    eager_sample = min(timed(samples["eager"]) for _ in range(2))
    first_train = timed(steps["compiled"])
    print(f"compile, training step:  first compiled step {first_train:.1f} s vs eager step {eager_train:.2f} s "
          f"-> about {first_train - eager_train:.1f} s compiling; graphs: {counters['stats']['unique_graphs']}")
    first_sample = timed(samples["compiled"])
    print(f"compile, sampling step:  first compiled step {first_sample:.1f} s vs eager step {eager_sample:.2f} s "
          f"-> about {first_sample - eager_sample:.1f} s compiling; graphs: {counters['stats']['unique_graphs']}")

    # New shapes through the training step; dims are marked dynamic, so none of these should compile again.
    shapes = {"batch x2": (2 * args.batch, size, 1), "resolution x1.5": (args.batch, size * 3 // 2, 1),
              "frames 2": (args.batch, size, 2)}
    for what, (b, s, frames) in shapes.items():
        before = counters["stats"]["unique_graphs"]
        xb, yb = batch(b, s)
        if frames > 1:
            xb = torch.stack([xb] * frames, dim=2)
        seconds = timed(train_step_fn(compiled, xb, yb))
        print(f"new shape ({what}: x {tuple(xb.shape)}): first step {seconds:.2f} s, "
              f"graphs compiled {counters['stats']['unique_graphs'] - before}")

    timing = Timing(warmup=2, windows=args.windows, min_window_s=args.min_window)
    for mode, fns, per in (("train", steps, 1), ("sample", samples, SAMPLE_STEPS)):
        rates = {k: statistics.median(v) / per for k, v in interleaved_rates(fns, args.batch, timing).items()}
        print(f"{mode:6s} images/s: eager {rates['eager']:.2f}, compiled {rates['compiled']:.2f} "
              f"({rates['compiled'] / rates['eager']:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
