"""Throughput of patchflow's DiT beside diffusers' DiTTransformer2DModel of the same configuration.

Both models are built in this process and measured in the same run, interleaved window by window
(A B, then B A, ...) so drift in the machine's load or clock hits both alike; each figure is the median
of several timed windows after warmup.

  train:  one rectified-flow training step (x_t = (1-t) x0 + t eps, target eps - x0, logit-normal t,
          the model sees t * 1000), backward, AdamW step, zero_grad. The loss code is patchflow's
          `patchflow.flow.rectified` for both models. Each side steps its optimizer the way its own training
          code does: patchflow the trainer's `patchflow.train.optim.adamw` (the fused kernel), diffusers a
          plain `torch.optim.AdamW` as in its training examples.
  sample: one classifier-free-guided Euler step on a batch (cond + uncond in one doubled forward), under
          torch.inference_mode for both. patchflow goes through the `classifier_free` wrapper and the
          objective's Euler sampler exactly as `patchflow.pipeline.generate` does; diffusers doubles the
          latent and appends the null class as its DiTPipeline does, takes `.sample`, combines the halves.
          Reported as images/s for a 20-step sample.

Precision is chosen per side: `--precision bf16 --diffusers-precision fp32` puts patchflow's bf16 autocast
beside diffusers in fp32 (each user's default); by default both run the same precision.

MFU = achieved model FLOP/s / a measured matmul peak of this machine in that side's precision (see --help and
bench/README.md).

    python bench/train_throughput.py                       # S/2 @ 8,32 and Mini/4 @ 8,32,128
    python bench/train_throughput.py --config mini --batch 8 --quick
    python bench/train_throughput.py --config s2 b2 --precision bf16 --diffusers-precision fp32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from patchflow.config import FlowConfig
from patchflow.flops import counted_forward_flops, measure_matmul_peak
from patchflow.flow import rectified
from patchflow.flow.guidance import classifier_free
from patchflow.flow.objective import RectifiedFlowObjective
from patchflow.models.dit import DiT, DiTConfig
from patchflow.train.optim import adamw

SAMPLE_STEPS = 20        # images/s for sampling are quoted for a sample of this many Euler steps
GUIDANCE = 4.0           # DiTPipeline's default guidance scale
LR = 1e-4

# name -> (patchflow preset, latent size, channels, classes, default batches)
CONFIGS = {
    "s2": ("DiT-S/2", 32, 4, 1000, (8, 32)),
    "b2": ("DiT-B/2", 32, 4, 1000, (8, 32)),
    "mini": ("DiT-Mini/4", 32, 1, 10, (8, 32, 128)),   # the CPU demo model (configs/digits.toml)
    "mini28": ("DiT-Mini/4", 28, 1, 10, (8, 32, 128)),  # the same on 28x28 (7x7 tokens), MNIST-sized
}
DEFAULT_RUN = ("s2", "mini")


# ----------------------------------------------------------------------------------------------- models

@dataclass
class Impl:
    """One implementation under test: its model and a uniform forward(x, t, y) -> velocity."""

    name: str
    model: torch.nn.Module
    forward: object
    optimizer: torch.optim.Optimizer
    precision: str = "fp32"               # "fp32" or "bf16" (torch.autocast)
    fwd_flops: int = 0                    # forward FLOPs per image (batch-1 forward, counted)


def patchflow_config(preset: str, size: int, channels: int, classes: int) -> DiTConfig:
    # time_freq_shift / mlp_norm_eps follow diffusers so both compute the same function; neither changes cost.
    return DiTConfig.from_preset(preset, input_size=size, in_channels=channels, num_classes=classes,
                                 learn_sigma=False, class_dropout_prob=0.1, time_freq_shift=1.0, mlp_norm_eps=1e-5)


def build_patchflow(cfg: DiTConfig) -> Impl:
    model = DiT(cfg)
    return Impl("patchflow", model, lambda x, t, y: model(x, t, y), adamw(model.parameters(), lr=LR))


def build_diffusers(cfg: DiTConfig) -> Impl:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes)
    return Impl("diffusers", model, lambda x, t, y: model(x, timestep=t, class_labels=y).sample,
                torch.optim.AdamW(model.parameters(), lr=LR))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_report(pf: Impl, df: Impl) -> dict:
    """Counts, and how much of diffusers' surplus is its per-block copy of the timestep/label embedder."""
    blocks = df.model.transformer_blocks
    per_embedder = num_params(blocks[0].norm1.emb)
    duplicated = sum(num_params(b.norm1.emb) for b in blocks[1:])   # block 0's copy plays patchflow's role
    n_pf, n_df = num_params(pf.model), num_params(df.model)
    return {"patchflow": n_pf, "diffusers": n_df, "difference": n_df - n_pf, "embedder": per_embedder,
            "duplicated_embedders": len(blocks) - 1, "duplicated": duplicated,
            "unexplained": n_df - n_pf - duplicated}


# ------------------------------------------------------------------------------------------------ FLOPs

def forward_flops(impl: Impl, cfg: DiTConfig) -> int:
    """FLOPs of one forward of batch 1 (matmuls, convs, attention; elementwise ops are not counted)."""
    x = torch.randn(1, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.full((1,), 500.0), torch.zeros(1, dtype=torch.long)
    return counted_forward_flops(impl.forward, x, t, y)


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best GFLOP/s of an n^3 matmul in `dtype` (patchflow.flops.measure_matmul_peak)."""
    return measure_matmul_peak(dtype, n=n, reps=reps) / 1e9


# ------------------------------------------------------------------------------------------------ steps

def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(impl: Impl, x0: torch.Tensor, y: torch.Tensor):
    """A closure running one full training step of `impl` on the fixed batch (x0, y)."""
    impl.model.train()
    opt, precision = impl.optimizer, impl.precision

    def velocity(xt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:   # flow time s in [0, 1] -> model units
        return impl.forward(xt, s * rectified.TIME_SCALE, y)

    def step() -> None:
        t = rectified.sample_timesteps(x0.shape[0], "logit_normal")
        noise = torch.randn_like(x0)
        with autocast(precision):
            loss = rectified.flow_loss(velocity, x0, noise, t).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def patchflow_sample_step_fn(impl: Impl, cfg: DiTConfig, noise: torch.Tensor, y: torch.Tensor):
    """One guided Euler step through patchflow's pipeline path (classifier_free + objective.sample)."""
    impl.model.eval()
    precision = impl.precision
    objective = RectifiedFlowObjective(FlowConfig())
    null = torch.full_like(y, cfg.num_classes)
    guided = classifier_free(impl.model, y, null, GUIDANCE, interval=(0.0, 1.0), t_max=objective.t_max)
    latents = noise.unsqueeze(2)             # generate() samples (B, C, T=1, H, W)

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision):
            return objective.sample(guided, latents, steps=1, sampler="euler")

    return step


def diffusers_sample_step_fn(impl: Impl, cfg: DiTConfig, noise: torch.Tensor, y: torch.Tensor):
    """One guided Euler step done the DiTPipeline way: doubled latent, labels + null class, `.sample`, combine."""
    impl.model.eval()
    precision = impl.precision
    labels = torch.cat([y, torch.full_like(y, cfg.num_classes)])
    t, t_next = 1.0, 1.0 - 1.0 / SAMPLE_STEPS

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision):
            latent_in = torch.cat([noise] * 2)
            timesteps = torch.tensor([t * rectified.TIME_SCALE]).expand(latent_in.shape[0])
            out = impl.model(latent_in, timestep=timesteps, class_labels=labels).sample
            cond, uncond = torch.split(out, len(out) // 2, dim=0)
            velocity = uncond + GUIDANCE * (cond - uncond)
            return noise + (t_next - t) * velocity

    return step


# ----------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    warmup: int          # untimed calls per implementation
    windows: int         # timed windows per implementation, interleaved
    min_window_s: float  # calls per window are chosen so a window lasts about this long


def calls_per_window(seconds_per_call: float, min_window_s: float) -> int:
    return max(1, math.ceil(min_window_s / max(seconds_per_call, 1e-9)))


def interleaved_rates(steps: dict, images_per_call: int, timing: Timing) -> dict[str, list[float]]:
    """steps: name -> zero-argument callable. Returns name -> images/s of every timed window.

    Every implementation gets the same number of calls per window; the order alternates between windows.
    """
    slowest = 0.0
    for fn in steps.values():
        start = time.perf_counter()
        for _ in range(timing.warmup):
            fn()
        slowest = max(slowest, (time.perf_counter() - start) / max(timing.warmup, 1))
    calls = calls_per_window(slowest, timing.min_window_s)
    names = list(steps)
    rates = {name: [] for name in names}
    for window in range(timing.windows):
        for name in (names if window % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                steps[name]()
            rates[name].append(images_per_call * calls / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------------------------------------------------- results

@dataclass
class Row:
    config: str
    batch: int
    mode: str                      # "train" or "sample"
    patchflow: float               # images/s (sample: images/s of a SAMPLE_STEPS-step sample)
    diffusers: float
    patchflow_tflops: float        # achieved model TFLOP/s
    diffusers_tflops: float
    patchflow_mfu: float
    diffusers_mfu: float
    windows: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.patchflow / self.diffusers


COLUMNS = ("config", "batch", "mode", "patchflow img/s", "diffusers img/s", "ratio pf/df",
           "patchflow MFU", "diffusers MFU", "pf TFLOP/s", "df TFLOP/s")
WIDTHS = (7, 6, 7, 16, 16, 12, 14, 14, 11, 11)


def format_row(cells) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def print_header() -> None:
    print(format_row(COLUMNS))
    print(format_row("-" * w for w in WIDTHS))


def print_row(r: Row) -> None:
    print(format_row((r.config, r.batch, r.mode, f"{r.patchflow:.2f}", f"{r.diffusers:.2f}", f"{r.ratio:.3f}",
                      f"{100 * r.patchflow_mfu:.1f}%", f"{100 * r.diffusers_mfu:.1f}%",
                      f"{r.patchflow_tflops:.4f}", f"{r.diffusers_tflops:.4f}")), flush=True)


def make_row(config: str, batch: int, mode: str, rates: dict, pf: Impl, df: Impl, peaks: dict) -> Row:
    """Medians of the windows; model FLOPs per image are 3 x forward for training, 2 x forward (the doubled
    CFG batch) per sampling step. Sampling rates come in per step and are reported per SAMPLE_STEPS sample."""
    per_image = 3 if mode == "train" else 2
    per_sample = 1 if mode == "train" else SAMPLE_STEPS
    med = {name: statistics.median(r) for name, r in rates.items()}
    tflops = {impl.name: per_image * impl.fwd_flops * med[impl.name] / 1e12 for impl in (pf, df)}
    mfu = {impl.name: tflops[impl.name] * 1e3 / peaks[impl.precision] for impl in (pf, df)}
    return Row(config, batch, mode, med["patchflow"] / per_sample, med["diffusers"] / per_sample,
               tflops["patchflow"], tflops["diffusers"], mfu["patchflow"], mfu["diffusers"],
               windows={name: [v / per_sample for v in r] for name, r in rates.items()})


# ------------------------------------------------------------------------------------------------- main

def bench_config(name: str, batches, args, timing: Timing, peaks: dict, rows: list, info: dict) -> None:
    preset, size, channels, classes, _ = CONFIGS[name]
    cfg = patchflow_config(preset, size, channels, classes)
    torch.manual_seed(0)
    pf, df = build_patchflow(cfg), build_diffusers(cfg)
    pf.precision, df.precision = args.precision, args.diffusers_precision
    params = parameter_report(pf, df)
    for impl in (pf, df):
        impl.fwd_flops = forward_flops(impl, cfg)
    info[name] = {"preset": preset, "latent": [channels, size, size], "num_classes": classes,
                  "hidden": cfg.hidden_size, "depth": cfg.depth, "heads": cfg.num_heads, "patch": cfg.patch_size,
                  "params": params, "forward_flops_per_image": {i.name: i.fwd_flops for i in (pf, df)}}
    print(f"\n{name}: {preset} on {channels}x{size}x{size}, {classes} classes "
          f"(hidden {cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size})")
    print(f"  params: patchflow {params['patchflow']:,}  diffusers {params['diffusers']:,}  "
          f"difference {params['difference']:,} = {params['duplicated_embedders']} duplicated per-block "
          f"timestep/label embedders x {params['embedder']:,}"
          + (f"  (unexplained: {params['unexplained']:,})" if params["unexplained"] else ""))
    print(f"  forward GFLOP/image: patchflow {pf.fwd_flops / 1e9:.3f}  diffusers {df.fwd_flops / 1e9:.3f}")
    print_header()
    for batch in batches:
        x0 = torch.randn(batch, channels, size, size)
        y = torch.randint(0, classes, (batch,))
        modes = {
            "train": {i.name: train_step_fn(i, x0, y) for i in (pf, df)},
            "sample": {"patchflow": patchflow_sample_step_fn(pf, cfg, x0, y),
                       "diffusers": diffusers_sample_step_fn(df, cfg, x0, y)},
        }
        for mode, steps in modes.items():
            row = make_row(name, batch, mode, interleaved_rates(steps, batch, timing), pf, df, peaks)
            rows.append(row)
            print_row(row)


def add_common_args(p: argparse.ArgumentParser, warmup: int, windows: int) -> None:
    """Precision per side, threads and timing knobs: the options every side-by-side bench shares."""
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="patchflow's precision: fp32 (default), or bf16 = torch.autocast('cpu', bfloat16); its MFU "
                        "is then against a bf16 matmul peak")
    p.add_argument("--diffusers-precision", choices=("fp32", "bf16"), default=None,
                   help="diffusers' precision (default: the same as --precision)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls per implementation (default {warmup})")
    p.add_argument("--windows", type=int, default=windows,
                   help=f"timed windows per implementation; the median is reported (default {windows})")
    p.add_argument("--min-window", type=float, default=2.0, help="seconds a timed window should last at least (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write every figure here")


def apply_common_args(args: argparse.Namespace) -> None:
    args.diffusers_precision = args.diffusers_precision or args.precision
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=None,
                   help="which models (default: s2 and mini)")
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help="batch sizes for every chosen config (default: s2/b2 8 32, mini 8 32 128)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warmup call, 3 windows of 1 call, 1024^3 peak")
    add_common_args(p, warmup=3, windows=7)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_common_args(args)
    if args.quick:
        timing, peak_n, peak_reps = Timing(warmup=1, windows=3, min_window_s=0.0), 1024, 10
    else:
        timing, peak_n, peak_reps = Timing(args.warmup, args.windows, args.min_window), 2048, 10
    import diffusers

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(dtypes[p], peak_n, peak_reps) for p in sorted({args.precision, args.diffusers_precision})}
    precisions = f"patchflow {args.precision}, diffusers {args.diffusers_precision}"
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "precision": {"patchflow": args.precision, "diffusers": args.diffusers_precision},
           "timing": asdict(timing), "sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE,
           "peak_gflops": peaks, "peak_matmul": f"{peak_n}^3"}
    print(f"torch {env['torch']}, diffusers {env['diffusers']}, {env['threads']} threads, {precisions}; "
          f"timing: {timing.warmup} warmup, median of {timing.windows} interleaved windows of >= "
          f"{timing.min_window_s:g}s")
    for p, peak in peaks.items():
        print(f"matmul peak ({peak_n}^3 {p}, best of {peak_reps}): {peak:.1f} GFLOP/s")
    rows, info = [], {}
    for name in args.config or DEFAULT_RUN:
        bench_config(name, args.batch or CONFIGS[name][4], args, timing, peaks, rows, info)
    print(f"\nratio = patchflow / diffusers images/s (> 1: patchflow faster). sample img/s are for a "
          f"{SAMPLE_STEPS}-step CFG sample (scale {GUIDANCE}). MFU = model FLOP/s / matmul peak of that side's "
          f"precision; train counts 3x forward FLOPs per image, sample 2x (cond + uncond) per step.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "configs": info,
                       "rows": [{**asdict(r), "ratio": r.ratio} for r in rows]}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
