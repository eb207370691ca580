"""Rectified flow (Liu et al.; SD3's setting): x_t = (1 - t) x0 + t eps, target velocity eps - x0.

t = 0 is data and t = 1 is noise. Models see t * 1000 so their timestep embedding works in DiT's units.
"""
from __future__ import annotations

import math

import torch

TIME_SCALE = 1000.0  # model units per unit of flow time
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0, noise: (B, ...); t: (B,) in [0, 1] -> x_t."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the straight path."""
    return noise - x0


def sample_timesteps(n: int, method: str = "logit_normal", *, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Training timesteps (n,) in (0, 1): uniform, logit-normal(m, s), or SD3's mode sampling with scale s."""
    if method == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    if method == "mode":
        u = torch.rand(n, generator=generator, device=device)
        return 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    raise ValueError(f"unknown timestep sampling {method!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift: more time at high noise when shift > 1. t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int) -> float:
    """Shift that keeps the signal-to-noise ratio of a larger resolution equal to the base one: sqrt(m / n)."""
    return math.sqrt(num_tokens / base_tokens)


def contrast_error(pred: torch.Tensor, target: torch.Tensor, contrast: float) -> torch.Tensor:
    """Elementwise (pred - target)^2, less `contrast` x (pred - the next batch item's target)^2: contrastive flow
    matching (Stoica et al. 2025), which keeps the flows of different conditions apart. contrast 0 or a batch of
    one: the plain squared error."""
    err = (pred.float() - target.float()).pow(2)
    if contrast and target.shape[0] > 1:
        err = err - contrast * (pred.float() - target.roll(1, dims=0).float()).pow(2)
    return err


def flow_loss(velocity_fn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              contrast: float = 0.0) -> torch.Tensor:
    """Per-sample MSE between the predicted and the target velocity. velocity_fn(x_t, t) with t in [0, 1]."""
    pred = velocity_fn(interpolate(x0, noise, t), t)
    return contrast_error(pred, velocity_target(x0, noise), contrast).flatten(1).mean(1)


def context_flow_loss(velocity_fn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      given: torch.Tensor, contrast: float = 0.0) -> torch.Tensor:
    """flow_loss with given frames: x0, noise (B, C, T, H, W); t (B,); given (B, T) bool. Given frames are clean
    (time 0) and left out of the loss; velocity_fn gets per-frame times (B, T). Per-sample mean over the rest."""
    tf = t[:, None] * (~given).to(t.dtype)  # (B, T)
    w = tf[:, None, :, None, None].to(x0.dtype)
    pred = velocity_fn((1 - w) * x0 + w * noise, tf)
    err = contrast_error(pred, velocity_target(x0, noise), contrast).mean(dim=(1, 3, 4))  # (B, T)
    keep = (~given).float()
    return (err * keep).sum(1) / keep.sum(1).clamp(min=1)
