"""Classifier-free guidance: one batched forward for the conditional and unconditional branches."""
from __future__ import annotations

import torch


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int | None = None) -> torch.Tensor:
    """uncond + scale * (cond - uncond) on the first `channels` channels (dim 1); the rest (a learned
    variance) is taken from the conditional branch."""
    if channels is None or channels == cond.shape[1]:
        return uncond + scale * (cond - uncond)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def drop_labels(y: torch.Tensor, null: int, prob: float, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Replace each label by `null` with probability `prob` (guidance training). The draw covers the global
    batch (world x local) and keeps this rank's slice, so N processes drop what one process would."""
    if prob <= 0:
        return y
    rank, world = shard
    b = y.shape[0]
    drop = torch.rand(b * world, generator=generator, device=y.device)[rank * b:(rank + 1) * b] < prob
    return torch.where(drop, torch.full_like(y, null), y)


def classifier_free(model, y: torch.Tensor, null: torch.Tensor, scale: float,
                    interval: tuple[float, float] = (0.0, 1.0), t_max: float = 1000.0):
    """Wrap model(x, t, y) into fn(x, t) that applies guidance `scale`.

    Guidance is applied only where t / t_max lies in `interval` (Kynkaanniemi et al. 2024 limit it to the
    middle of the noise range); elsewhere only the conditional branch runs. scale == 1 never doubles the batch.
    """
    lo, hi = interval

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = float(t.reshape(-1)[0]) / t_max
        if scale == 1.0 or not lo <= level <= hi:
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        return combine(cond, uncond, scale, channels=x.shape[1])

    return fn
