"""Classifier-free guidance: one batched forward for the conditional and unconditional branches."""
from __future__ import annotations

import torch

from patchflow.flow.draws import global_coins


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
    drop = global_coins((), y.shape[0], prob, shard, generator, y.device)
    return torch.where(drop, torch.full_like(y, null), y)


def _cat(a, b):
    """Join the conditional and unconditional inputs on the batch axis: tensors, or dicts of tensors."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _call(model, x, t, cond):
    return model(x, t, **cond) if isinstance(cond, dict) else model(x, t, cond)


def classifier_free(model, cond, null, scale: float, interval: tuple[float, float] = (0.0, 1.0),
                    t_max: float = 1000.0):
    """Wrap model(x, t, cond) into fn(x, t) that applies guidance `scale`.

    `cond` / `null` are label tensors (B,) passed as the model's third argument, or dicts of (B, ...) tensors
    passed as keywords (a text model's `text`, `text_mask`, `pooled`; `null` is the empty or negative prompt).
    Guidance is applied only where t / t_max lies in `interval` (Kynkaanniemi et al. 2024 limit it to the
    middle of the noise range); elsewhere only the conditional branch runs. scale == 1 never doubles the batch.
    """
    lo, hi = interval
    both = _cat(cond, null) if scale != 1.0 else None

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = t.reshape(t.shape[0], -1).amax(1) / t_max  # per-frame times: the noisiest frame
        inside = (level >= lo) & (level <= hi)  # per sample: a distillation batch mixes times
        if scale == 1.0 or not bool(inside.any()):
            return _call(model, x, t, cond)
        out = _call(model, torch.cat([x, x]), torch.cat([t, t]), both)
        cond_out, uncond_out = out.chunk(2)
        guided = combine(cond_out, uncond_out, scale, channels=x.shape[1])
        return guided if bool(inside.all()) else torch.where(inside.reshape((-1,) + (1,) * (x.ndim - 1)), guided,
                                                             cond_out)

    return fn
