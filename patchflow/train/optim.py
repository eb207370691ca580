"""The optimizer the trainer (and the benches) use: AdamW on its fused kernel where PyTorch has one; and its LR
schedule."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")  # devices with a fused AdamW kernel in torch >= 2.4


def adamw(params: Iterable[torch.nn.Parameter], lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0
          ) -> torch.optim.AdamW:
    """AdamW with fp32 states. The fused kernel updates all tensors in one pass instead of ~10 ops per
    tensor: on a 2-core CPU it makes a DiT-Mini/4 training step 7% (fp32) to 12% (bf16) faster."""
    params = list(params)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, steps: int, warmup_steps: int = 0, schedule: str = "constant", decay_steps: int = 0,
              final: float = 0.0) -> float:
    """The LR multiplier for optimizer step `step` (0-based) of `steps`: a linear warmup, then constant, or a
    cosine or linear decay to `final` over the last `decay_steps` steps (0: all steps after the warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = min(decay_steps or steps, max(1, steps - warmup_steps))
    start = steps - span
    done = min(1.0, max(0.0, (step + 1 - start) / span))  # reaches `final` on the last step
    shape = 0.5 * (1 + math.cos(math.pi * done)) if schedule == "cosine" else 1.0 - done
    return final + (1.0 - final) * shape
