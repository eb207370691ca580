"""Exponential moving average of the trainable weights, updated in place with fused foreach ops.

The shadow tensors are clones of the parameters, so under FSDP they are sharded exactly like them (fp32, like
the sharded master weights) and the update needs no communication; `state_dict()` gathers full tensors when they
are needed, and only the process that saves them keeps a copy.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard gathers; a tensor is whole


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, skip: str = ""):
        """model: the plain, DDP-unwrapped or FSDP-sharded module whose parameters are averaged; parameters whose
        names start with `skip` (REPA's projector: training only) are not, nor frozen ones."""
        self.decay, self.warmup, self.updates = decay, warmup, 0
        if model.state_dict().keys() != dict(model.named_parameters()).keys():
            raise ValueError("EMA averages parameters only; this model has persistent buffers")
        # frozen parameters (a LoRA run's base) never change: nothing to average
        self.keep = [p.requires_grad and not (skip and name.startswith(skip)) for name, p in model.named_parameters()]
        self.names = [name for (name, _), k in zip(model.named_parameters(), self.keep) if k]
        self.shadow = [p.detach().clone() for p, k in zip(model.parameters(), self.keep) if k]

    def current_decay(self) -> float:
        """With warmup, min(decay, (1 + n) / (10 + n)) so a short run's EMA is not stuck at init."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        new = [p.detach() for p, k in zip(model.parameters(), self.keep) if k]
        torch._foreach_lerp_(self.shadow, new, 1.0 - self.current_decay())
        self.updates += 1

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """Full CPU tensors by parameter name, or None where keep is False. Under FSDP a collective (every process
        calls it): tensors are gathered one at a time and only processes with keep=True hold them in full."""
        if not keep and not any(hasattr(t, "full_tensor") for t in self.shadow):
            return None
        out = {}
        for name, t in zip(self.names, self.shadow):
            full = _full(t)
            if keep:
                out[name] = full.detach().contiguous().cpu().clone()
        return out if keep else None

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"EMA weights lack {missing[:5]}")
        for name, t in zip(self.names, self.shadow):
            full = tensors[name].to(t.dtype)
            if hasattr(t, "full_tensor"):  # keep our shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                t.copy_(distribute_tensor(full.to(t.device_mesh.device_type), t.device_mesh, t.placements))
            else:
                t.copy_(full)
