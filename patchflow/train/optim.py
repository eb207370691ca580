"""The optimizer the trainer (and the benches) use: AdamW on its fused kernel where PyTorch has one."""
from __future__ import annotations

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
