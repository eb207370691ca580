"""patchflow's adapter file: a .safetensors of `<layer>.lora_down.weight` / `<layer>.lora_up.weight` pairs, with
rank, alpha, targets, blocks, the model's arch and the base's weights hash in its metadata."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from patchflow.checks import ConfigError
from patchflow.lora.adapters import layers_of
from patchflow.weights import CheckpointError, atomic_save_safetensors

FORMAT, VERSION = "patchflow.lora", "1"


@dataclass
class Adapter:
    weights: dict[str, torch.Tensor]
    rank: int
    alpha: float
    targets: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    base_hash: str = ""
    arch: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "rank": str(self.rank), "alpha": repr(float(self.alpha)),
                "targets": json.dumps(self.targets), "blocks": json.dumps(self.blocks), "base_hash": self.base_hash,
                "arch": self.arch}


def adapter_from_config(weights: dict, lora, arch: str) -> Adapter:
    """An Adapter of a run's weights; lora: its LoRAConfig."""
    return Adapter({k: v.detach().cpu().contiguous() for k, v in weights.items()}, lora.rank,
                   float(lora.alpha or lora.rank), list(lora.targets), list(lora.blocks), lora.base_hash, arch)


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: an adapter file is written as .safetensors")
    layers_of(adapter.weights)  # pairs only
    atomic_save_safetensors(adapter.weights, path, metadata=adapter.metadata())
    return path


def open_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors adapter file of any format; a pickle or a corrupt file is refused with
    what it is, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: adapters are read only from .safetensors files (a pickle can run code; "
                              f"it is never loaded)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); refusing to read it") from None


def parse_adapter(weights: dict, meta: dict, path) -> Adapter:
    """A patchflow adapter from a file's tensors and metadata; CheckpointError says what is wrong."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a patchflow adapter (metadata format = {meta.get('format')!r}, "
                              f"expected {FORMAT!r}); write one with `patchflow lora export RUN --out FILE`")
    try:
        layers = layers_of(weights)
        ranks = {int(weights[layer + ".lora_down.weight"].shape[0]) for layer in layers}
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        targets, blocks = json.loads(meta.get("targets", "[]")), json.loads(meta.get("blocks", "[]"))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: broken adapter file ({e})") from None
    if not layers or ranks != {rank} or rank < 1:
        raise CheckpointError(f"{path}: adapter layers have ranks {sorted(ranks)}, its metadata says rank {rank}")
    return Adapter(weights, rank, alpha, targets, blocks, meta.get("base_hash", ""), meta.get("arch", ""))
