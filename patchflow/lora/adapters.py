"""Low-rank adapters on a model's Linear layers: which layers (patterns and blocks), the adapted layer, and the
merge of an adapter into plain weights (pure functions of state dicts).

An adapted layer keeps the base's weight and bias under their own names, so a state dict holds the base keys
unchanged beside `<layer>.lora_down.weight` (rank, in) and `<layer>.lora_up.weight` (out, rank), the names kohya's
files use. The update is scale * up @ down with scale = alpha / rank; `up` starts at zero, so an adapted model
computes exactly its base at step 0.
"""
from __future__ import annotations

import fnmatch
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchflow.checks import ConfigError

DOWN, UP = ".lora_down.weight", ".lora_up.weight"
_IN_BLOCK = re.compile(r"^(?:blocks|temporal_blocks)\.(\d+)\.(.+)$")


class LoRALinear(nn.Linear):
    """A frozen Linear (the same weight and bias tensors) plus a trainable rank-r update: x: (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # PEFT's and kohya's init of A
        nn.init.zeros_(self.lora_up.weight)
        self.scale, self.dropout = scale, nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_up(self.lora_down(self.dropout(x))) * self.scale


def _inside(name: str) -> str:
    """A layer's name inside its block ("blocks.3.attn.qkv" -> "attn.qkv"); a layer outside blocks keeps its own."""
    m = _IN_BLOCK.match(name)
    return m.group(2) if m else name


def matches(name: str, targets, blocks) -> bool:
    """Whether Linear `name` is a target: a pattern matches its full name or its name inside its block, and
    with `blocks` given it must sit in one of them."""
    m = _IN_BLOCK.match(name)
    if blocks and (m is None or int(m.group(1)) not in blocks):
        return False
    return any(fnmatch.fnmatchcase(n, t) for t in targets for n in {name, _inside(name)})


def target_names(model: nn.Module, targets, blocks=()) -> list[str]:
    """The Linear layers of `model` the patterns choose; a pattern or block that chooses none is an error (a typo
    must not train nothing)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
               and ".lora_" not in n]
    depth = max((int(m.group(1)) + 1 for n in linears if (m := _IN_BLOCK.match(n))), default=0)
    beyond = [b for b in blocks if b >= depth]
    if beyond:
        raise ConfigError(f"lora.blocks {beyond} are beyond the model's blocks 0..{depth - 1}")
    chosen = [n for n in linears if matches(n, targets, blocks)]
    for t in targets:
        if not any(matches(n, [t], blocks) for n in linears):
            where = f" in blocks {list(blocks)}" if blocks else ""
            raise ConfigError(f"lora.targets pattern {t!r} matches no Linear layer{where}; layers are: "
                              f"{', '.join(sorted({_inside(n) for n in linears}))}")
    return chosen


def add_adapters(model: nn.Module, cfg) -> list[str]:
    """Put a rank-`cfg.rank` adapter on every target of `model` (in place) and freeze everything else; returns
    the adapted layers' names. cfg: a LoRAConfig."""
    names = target_names(model, cfg.targets, cfg.blocks)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.scale, cfg.dropout))
    return names


def is_adapter_key(key: str) -> bool:
    return key.endswith(DOWN) or key.endswith(UP)


def split_adapter(state: dict) -> tuple[dict, dict]:
    """A state dict -> (base weights, adapter weights)."""
    return ({k: v for k, v in state.items() if not is_adapter_key(k)},
            {k: v for k, v in state.items() if is_adapter_key(k)})


def layers_of(adapter: dict) -> list[str]:
    """The layer names an adapter's weights cover; each needs both halves."""
    downs = {k[:-len(DOWN)] for k in adapter if k.endswith(DOWN)}
    ups = {k[:-len(UP)] for k in adapter if k.endswith(UP)}
    if downs != ups or len(downs) * 2 != len(adapter):
        odd = sorted((downs ^ ups) | {k for k in adapter if not is_adapter_key(k)})
        raise ValueError(f"adapter weights are not pairs of {DOWN!r} and {UP!r}: {odd[:5]}")
    return sorted(downs)


def delta(adapter: dict, layer: str, scale: float) -> torch.Tensor:
    """(out, in) float32: the weight update of one layer, scale * up @ down."""
    return scale * adapter[layer + UP].float() @ adapter[layer + DOWN].float()


@torch.no_grad()
def merge(weights: dict, adapters) -> dict:
    """Base weights with adapters baked in: adapters is [(adapter weights, scale)], scale including alpha / rank
    and the user's strength; stacked adapters add their deltas. The result keeps each weight's dtype."""
    out = dict(weights)
    for adapter, scale in adapters:
        for layer in layers_of(adapter):
            key = layer + ".weight"
            if key not in out:
                raise ValueError(f"the adapter has layer {layer!r}, which the base model does not have")
            w = out[key]
            d = delta(adapter, layer, scale)
            if tuple(d.shape) != tuple(w.shape):
                raise ValueError(f"the adapter's {layer!r} update is {tuple(d.shape)}, the base weight "
                                 f"{tuple(w.shape)}: an adapter for another model")
            out[key] = (w.float() + d).to(w.dtype)
    return out
