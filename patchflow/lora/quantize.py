"""The frozen base of a LoRA run in int8 (weight-only, per output channel, torchao): the base Linear weights take a
quarter of their float32 memory; activations, adapters and gradients stay in the training precision."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from patchflow.checks import ConfigError

ADAPTER_LAYERS = ("lora_down", "lora_up")


def quantize_base(model: nn.Module) -> int:
    """Every frozen Linear weight of `model` (not the adapters) to int8 in place; returns how many."""
    try:
        logging.getLogger("torchao").setLevel(logging.ERROR)  # it reports each GPU kernel library it cannot load
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("lora.quantize_base = \"int8\" needs torchao: pip install torchao") from None
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in ADAPTER_LAYERS
              and not m.weight.requires_grad]
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in chosen)
    return len(chosen)


def plain_state(state: dict) -> dict:
    """A state dict with quantized tensors dequantized (float32), for merges and previews."""
    return {k: v.dequantize() if hasattr(v, "dequantize") and type(v) is not torch.Tensor else v
            for k, v in state.items()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take, counting a quantized tensor's int8 data and scales."""
    total = 0
    for p in model.state_dict().values():
        parts = [getattr(p, a) for a in ("qdata", "scale", "zero_point") if isinstance(getattr(p, a, None),
                                                                                    torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in parts) if parts else p.numel() * p.element_size()
    return total
