"""FLOPs in DiT's convention: multiply-accumulates (MACs) of matmuls and attention, forward pass.

DiT reports "Gflops" that are MACs (DiT-XL/2 at 256px: 118.6); FLOPs = 2 x MACs. A training step costs
about 3x the forward (backward = 2x forward). Elementwise ops are not counted, as in the paper.
"""
from __future__ import annotations

import functools
import time
import warnings

import torch
import torch.utils.flop_counter as flop_counter

from patchflow.models.dit import DiTConfig


def dit_forward_macs(cfg: DiTConfig, frames: int | None = None, size: int | tuple[int, int] | None = None) -> int:
    """Analytic forward MACs of one sample of `DiT(cfg)` at a latent (T, H, W) (defaults from cfg)."""
    t = frames or cfg.frames
    h, w = (size, size) if isinstance(size, int) else (size or (cfg.input_size, cfg.input_size))
    p, d = cfg.patch_size, cfg.hidden_size
    n = t * (h // p) * (w // p)
    mlp = int(d * cfg.mlp_ratio)
    per_token = (cfg.in_channels * p * p * d                          # patch embedding
                 + cfg.depth * (4 * d * d + 2 * d * mlp + 2 * n * d)  # qkv + proj, MLP, QK^T and AV
                 + d * p * p * cfg.out_channels)                      # final linear
    per_sample = 256 * d + d * d + cfg.depth * 6 * d * d + 2 * d * d  # timestep MLP, adaLN, final adaLN
    return n * per_token + per_sample


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel SDPA picks on CPUs.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def mfu_of_macs(macs_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training from forward MACs per second: 3 x forward FLOPs against the peak."""
    return 3 * 2 * macs_per_s / peak_flops


def counted_forward_flops(model, *inputs) -> int:
    """FLOPs (2 x MACs) of model(*inputs) counted by PyTorch's FlopCounterMode, attention included."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
    with torch.inference_mode(), counter:
        model(*inputs)
    return counter.get_total_flops()


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5,
                        device: str | torch.device = "cpu") -> float:
    """Best FLOP/s of an n^3 matmul in `dtype` on `device`: the peak that MFU is measured against."""
    g = torch.Generator(device).manual_seed(0)  # leaves the global RNG alone
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# the same measurement once per process: trainers started one after another (tests, demos) share it
matmul_peak = functools.cache(measure_matmul_peak)


def warn_if_bf16_is_slow(device: str | torch.device, setting: str) -> None:
    """Warn when bf16 autocast was asked for on a CPU whose bf16 matmuls run below half its fp32 speed: CPUs without
    AVX512-BF16 or AMX emulate them, measured here up to 100x slower than fp32. `setting`: the config key to change."""
    if torch.device(device).type != "cpu":
        return
    bf16, fp32 = matmul_peak(torch.bfloat16, n=512, reps=2), matmul_peak(torch.float32, n=512, reps=2)
    if bf16 < fp32 / 2:
        warnings.warn(f"{setting} = \"bf16\", but this CPU runs bf16 matmuls at {bf16 / 1e9:.1f} GFLOP/s against "
                      f"{fp32 / 1e9:.1f} in fp32 (no native bf16: AVX512-BF16 or AMX), so expect it to be far slower "
                      f"than fp32: set {setting} = \"fp32\" (train, demo: --set {setting}=fp32; sampling a run: "
                      f"its config.toml)", stacklevel=2)


BF16_MARGIN = 1.2  # "measurably faster": on a CPU, "auto" takes bf16 only at this multiple of the fp32 rate or more


def choose_precision(device: str | torch.device) -> tuple[str, dict[str, float]]:
    """What precision = "auto" runs on `device`: ("bf16" or "fp32", the matmul FLOP/s that decided it). A GPU: bf16
    autocast when it supports bf16 (torch.cuda.is_bf16_supported; nothing measured, rates {}). A CPU: bf16 when its
    bf16 matmuls measure at least BF16_MARGIN x its fp32 ones (AMX, AVX512-BF16), else fp32; measured once per
    process (matmul_peak), not read from CPU flags. Any other device: fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp32"), {}
    if device.type != "cpu":
        return "fp32", {}
    rates = {"bf16": matmul_peak(torch.bfloat16, n=512, reps=2), "fp32": matmul_peak(torch.float32, n=512, reps=2)}
    return ("bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"), rates


def resolve_precision(setting: str, device: str | torch.device) -> str:
    """train.precision or sample.precision as it runs on `device`: "auto" chosen by choose_precision, any other
    value itself."""
    return choose_precision(device)[0] if setting == "auto" else setting


def run_forward_macs(cfg, net: torch.nn.Module) -> int:
    """Forward MACs per training sample of a run's model (RunConfig): analytic for a DiT, counted by PyTorch for a
    text model (on `models.example_inputs`) and for a codec run's autoencoder (on one item of the run's data)."""
    if cfg.kind.labels:
        return dit_forward_macs(cfg.model)
    device = next(net.parameters()).device
    if cfg.kind.prompts:
        from patchflow.models import example_inputs

        args, kwargs = example_inputs(cfg.model, 1, device)
        return counted_forward_flops(lambda: net(*args, **kwargs)) // 2
    from patchflow.data import pixel_shape

    c, t, s = pixel_shape(cfg.data)
    x = torch.zeros(1, c, t, s, s, device=device)
    noise = torch.zeros(net.codec.latent_shape(x.shape), device=device)
    return counted_forward_flops(net, x, noise) // 2


def mfu(images_per_s: float, forward_macs: int, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: 3 x forward FLOPs per image against the peak."""
    return 3 * 2 * forward_macs * images_per_s / peak_flops
