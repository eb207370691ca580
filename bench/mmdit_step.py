"""Step time of patchflow's MMDiT beside diffusers' SD3Transformer2DModel: the same config, the same weights.

The diffusers model is built and given random weights; patchflow's model is imported from it
(`patchflow.convert.sd3`), and the two outputs are checked to agree in fp32 before anything is timed.

  train:  one rectified-flow step on a fixed batch (logit-normal t, x_t = (1-t) x0 + t eps, the model sees t * 1000,
          MSE to eps - x0, patchflow's `patchflow.flow.rectified` code for both), backward, AdamW step, zero_grad.
          Each side's optimizer is its own training code's: patchflow's `train.optim.adamw` (fused kernel),
          diffusers' examples' plain `torch.optim.AdamW` (`--optimizer fused` gives both the fused one).
  sample: one classifier-free-guided Euler step: the batch doubled (cond + empty-prompt uncond) in one forward
          under torch.inference_mode. patchflow through `classifier_free` + the objective's Euler sampler, as
          `patchflow.pipeline.generate` runs it; diffusers as StableDiffusion3Pipeline does (cat, .sample, combine).

Precisions (`--precision`): fp32 (both fp32), bf16 (both under torch.autocast bf16) and default (each library's
usual setting: patchflow bf16 autocast, as its text recipe trains and samples; diffusers fp32). The two sides
alternate window by window (A B, B A, ...), every window runs the same number of steps for both, and each figure
is the median window. The ratio is diffusers ms / patchflow ms: above 1 patchflow is faster.

    python bench/mmdit_step.py --threads 2                             # the color-digits recipe, batch 64
    python bench/mmdit_step.py --threads 1 --windows 3 --steps 2 --warmup 1 --batch 16   # a smoke test
    python bench/mmdit_step.py --threads 2 --mask padded --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from patchflow.config import FlowConfig
from patchflow.convert.sd3 import config_to_diffusers, diffusers_sd3_to_patchflow
from patchflow.flow import rectified
from patchflow.flow.guidance import classifier_free
from patchflow.flow.objective import RectifiedFlowObjective
from patchflow.models.mmdit import MMDiT
from patchflow.models.text_config import MMDiTConfig
from patchflow.train.optim import adamw

LR = 1e-4
GUIDANCE = 5.0           # the color-digits recipe's sample.guidance
PRECISIONS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "default": ("bf16", "fp32")}  # (pf, df)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ models


def bench_config(args) -> MMDiTConfig:
    return MMDiTConfig(input_size=args.size, in_channels=args.channels, patch_size=args.patch,
                       hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, text_dim=args.text_dim,
                       pooled_dim=args.pooled_dim, qk_norm=args.qk_norm, dual_attention_layers=args.dual_layers)


def build_pair(cfg: MMDiTConfig, seed: int = 0):
    """(patchflow MMDiT, diffusers SD3Transformer2DModel) with the same random weights, fp32."""
    from diffusers import SD3Transformer2DModel

    config = {k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")}
    theirs = SD3Transformer2DModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():  # every weight random, the zero-initialised ones too
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    _, weights = diffusers_sd3_to_patchflow(theirs.state_dict(), dict(theirs.config))
    ours = MMDiT(cfg)
    ours.load_state_dict(weights)
    return ours, theirs


def batch_inputs(cfg: MMDiTConfig, batch: int, text_len: int, mask_kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    mask = None
    if mask_kind == "padded":  # every other prompt a quarter shorter, as a batch of captions of mixed length
        lengths = torch.full((batch,), text_len)
        lengths[::2] = max(1, text_len * 3 // 4)
        mask = torch.arange(text_len)[None] < lengths[:, None]
    return x0, text, pooled, mask


def check_agreement(ours, theirs, cfg: MMDiTConfig) -> float:
    x, text, pooled, _ = batch_inputs(cfg, 2, 5, "none", seed=7)
    t = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        a = ours(x, t, text, pooled)
        b = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ steps


def train_step(model, forward, optimizer, x0, precision):
    """One training step of `forward(xt, t_model) -> velocity` on the fixed batch x0."""
    model.train()

    def step() -> None:
        t = rectified.sample_timesteps(x0.shape[0], "logit_normal")
        noise = torch.randn_like(x0)
        with autocast(precision):
            loss = rectified.flow_loss(lambda xt, s: forward(xt, s * rectified.TIME_SCALE), x0, noise, t).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def patchflow_sample_step(model, noise, text, pooled, mask, precision):
    """One guided Euler step the way patchflow.pipeline.generate takes it."""
    model.eval()
    cond = {"text": text, "pooled": pooled}
    null = {"text": torch.zeros_like(text), "pooled": torch.zeros_like(pooled)}
    if mask is not None:
        cond["text_mask"], null["text_mask"] = mask, torch.ones_like(mask)
    objective = RectifiedFlowObjective(FlowConfig())
    guided = classifier_free(model, cond, null, GUIDANCE, t_max=objective.t_max)

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision):
            return objective.sample(guided, noise, steps=1, sampler="euler")

    return step


def diffusers_sample_step(model, noise, text, pooled, precision, steps: int = 28):
    """One guided Euler step the way StableDiffusion3Pipeline takes it: doubled batch, .sample, combine."""
    model.eval()
    both_text = torch.cat([text, torch.zeros_like(text)])
    both_pooled = torch.cat([pooled, torch.zeros_like(pooled)])
    sigma, sigma_next = 1.0, 1.0 - 1.0 / steps

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision):
            latents = torch.cat([noise] * 2)
            t = torch.full((latents.shape[0],), sigma * rectified.TIME_SCALE)
            out = model(hidden_states=latents, timestep=t, encoder_hidden_states=both_text,
                        pooled_projections=both_pooled).sample
            cond, uncond = out.chunk(2)
            return noise + (sigma_next - sigma) * (uncond + GUIDANCE * (cond - uncond))

    return step


# ------------------------------------------------------------------------------------------------ timing


def interleaved_ms(steps: dict, warmup: int, windows: int, per_window: int) -> dict[str, list[float]]:
    """name -> ms per step of every timed window; both sides run `per_window` steps a window, order alternating."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    names = list(steps)
    ms = {name: [] for name in names}
    for window in range(windows):
        for name in (names if window % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(per_window):
                steps[name]()
            ms[name].append(1000 * (time.perf_counter() - start) / per_window)
    return ms


def run(args) -> list[dict]:
    torch.manual_seed(0)
    cfg = bench_config(args)
    x0, text, pooled, mask = batch_inputs(cfg, args.batch, args.text_len, args.mask)
    rows = []
    for precision in args.precision:
        pf_prec, df_prec = PRECISIONS[precision]
        for mode in args.mode:
            ours, theirs = build_pair(cfg)  # fresh weights and optimizer states per row
            if mode == "train":
                fused = args.optimizer == "fused"
                steps = {
                    "patchflow": train_step(ours, lambda xt, t: ours(xt, t, text, pooled, mask),
                                            adamw(ours.parameters(), lr=LR), x0, pf_prec),
                    "diffusers": train_step(theirs, lambda xt, t: theirs(
                        hidden_states=xt, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample,
                        adamw(theirs.parameters(), lr=LR) if fused else torch.optim.AdamW(theirs.parameters(), lr=LR),
                        x0, df_prec),
                }
            else:
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
                steps = {"patchflow": patchflow_sample_step(ours, noise[:, :, None], text, pooled, mask, pf_prec),
                         "diffusers": diffusers_sample_step(theirs, noise, text, pooled, df_prec)}
            ms = interleaved_ms(steps, args.warmup, args.windows, args.steps)
            pf, df = statistics.median(ms["patchflow"]), statistics.median(ms["diffusers"])
            row = {"mode": mode, "precision": precision, "patchflow_precision": pf_prec,
                   "diffusers_precision": df_prec, "patchflow_ms": pf, "diffusers_ms": df, "ratio": df / pf,
                   "windows_ms": ms}
            rows.append(row)
            print(f"{mode:6s}  {precision:8s}  {pf_prec + ' / ' + df_prec:12s}  {pf:10.1f}  {df:10.1f}  "
                  f"{df / pf:7.2f}x", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8, help="latent height = width (color-digits: 8)")
    p.add_argument("--channels", type=int, default=8, help="latent channels (color-digits: 8)")
    p.add_argument("--patch", type=int, default=2, help="patch size (color-digits: 2)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--pooled-dim", type=int, default=384)
    p.add_argument("--text-len", type=int, default=16, help="text tokens per prompt")
    p.add_argument("--batch", type=int, default=64, help="images per step (sampling runs 2x for guidance)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dual-layers", type=int, nargs="*", default=[], help="blocks with SD3.5 dual attention")
    p.add_argument("--mask", choices=["none", "padded"], default="none",
                   help="patchflow's text_mask: none (the same work as diffusers, which has no mask) or padded "
                        "(every other prompt a quarter padding, as mixed-length captions give)")
    p.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--mode", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    p.add_argument("--optimizer", choices=["own", "fused"], default="own",
                   help="own: each library's usual AdamW (patchflow fused, diffusers plain); fused: both fused")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 keeps torch's default)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--windows", type=int, default=7, help="timed windows per side, interleaved")
    p.add_argument("--steps", type=int, default=5, help="steps per window")
    p.add_argument("--json", help="write every figure and the settings to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args)
    ours, theirs = build_pair(cfg)
    diff = check_agreement(ours, theirs, cfg)
    n_pf, n_df = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    print(f"MMDiT {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents, patch {cfg.patch_size}, hidden "
          f"{cfg.hidden_size}, depth {cfg.depth}, heads {cfg.num_heads}, text {args.text_len}x{cfg.text_dim}, pooled "
          f"{cfg.pooled_dim}, qk_norm {cfg.qk_norm}, dual {cfg.dual_attention_layers}; batch {args.batch}; "
          f"text mask: {args.mask}")
    print(f"parameters: patchflow {n_pf:,}, diffusers {n_df:,} (the last block's unused text query projection); "
          f"fp32 outputs agree to {diff:.2e}")
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; "
          f"median of {args.windows} interleaved windows of {args.steps} steps after {args.warmup} warmup")
    print(f"{'mode':6s}  {'setting':8s}  {'pf / df':12s}  {'pf ms/step':>10s}  {'df ms/step':>10s}  {'df/pf':>8s}")
    rows = run(args)
    if args.json:
        info = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "parameters": {"patchflow": n_pf, "diffusers": n_df}, "fp32_max_abs_diff": diff, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
