"""ODE samplers for flow models. velocity_fn(x, t) with t: (B,) in [0, 1]; integrate from t=1 (noise) to 0."""
from __future__ import annotations

import torch

from patchflow.flow.rectified import shift_timesteps

SAMPLERS = ("euler", "heun")


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 to 0 (float64), uniform before the shift."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _call(velocity_fn, x: torch.Tensor, t: float) -> torch.Tensor:
    return velocity_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))


def euler(velocity_fn, x: torch.Tensor, timesteps: torch.Tensor, progress=None) -> torch.Tensor:
    """First-order: x <- x + (t_next - t) v(x, t). One model call per step."""
    ts = timesteps.tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * _call(velocity_fn, x, t)
        if progress is not None:
            progress.update(1)
    return x


def heun(velocity_fn, x: torch.Tensor, timesteps: torch.Tensor, progress=None) -> torch.Tensor:
    """Second-order trapezoid corrector; the last step to t=0 is Euler (as in EDM). Two calls per step."""
    ts = timesteps.tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = _call(velocity_fn, x, t)
        x_pred = x + (t_next - t) * v
        if t_next > 0:
            x = x + (t_next - t) * 0.5 * (v + _call(velocity_fn, x_pred, t_next))
        else:
            x = x_pred
        if progress is not None:
            progress.update(1)
    return x
