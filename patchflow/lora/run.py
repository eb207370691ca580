"""The weights a run samples with: its own, or for a LoRA run its base (train.init_from, hash-checked) with its
adapter merged in; and the base an adapter stacked on top must have been trained on."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.nn as nn

from patchflow.init_weights import check_base, load_start, weights_file
from patchflow.lora.adapters import merge
from patchflow.models import build_model
from patchflow.run_dir import latest_checkpoint, load_weights
from patchflow.weights import hash_files


@dataclasses.dataclass
class Base:
    """The weights file a run's model stands on: the run's own for a full run, train.init_from's for a LoRA run;
    its sha256 is computed once, when an adapter asks (a LoRA run's was computed by the hash check)."""
    path: Path
    digest: str = ""

    def sha256(self) -> str:
        self.digest = self.digest or hash_files([self.path])
        return self.digest


def lora_base(run_dir: Path, cfg, model: nn.Module) -> tuple[dict, Base]:
    """A LoRA run's frozen base: train.init_from loaded into `model` (a fresh model of the run's config), checked
    against the recorded hash -> (its state dict, the Base)."""
    path = load_start(cfg.kind.video, model, cfg.train.init_from)
    return model.state_dict(), Base(path, check_base(cfg.lora.base_hash, path, f"the LoRA run {run_dir}"))


def weights_on(base: dict | None, cfg, path: Path) -> dict:
    """Weights file `path` as sampling weights: the file itself (base None: a full run), or a LoRA run's adapters
    merged into its base's state dict."""
    return load_weights(path) if base is None else merge(base, [(load_weights(path), cfg.lora.scale)])


def run_weights(run_dir: Path, cfg, model: nn.Module, path: Path) -> tuple[dict, Base]:
    """The state dict a run samples with and the base it stands on: `path` itself for a full run; for a LoRA run
    its base (train.init_from, checked against the recorded hash) with the adapters of `path` merged in. `model`
    is a fresh model of the run's config (the base is loaded into it)."""
    if not cfg.lora.enabled:
        return load_weights(path), Base(path)
    base, identity = lora_base(run_dir, cfg, model)
    return weights_on(base, cfg, path), identity


def sampling_file(run_dir: Path, ema: bool = True) -> Path:
    """The weights file a run samples with: EMA by default, the latest checkpoint's when the run's own is missing."""
    name = "ema.safetensors" if ema else "model.safetensors"
    path = run_dir / name
    if not path.is_file():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{path} is missing and {run_dir}/checkpoints holds no complete checkpoint; "
                                    f"train first (patchflow train ... --out {run_dir})")
        path = ckpt / name
    return path


def sampling_weights(run_dir: Path, cfg, ema: bool = True) -> tuple[dict, Base, Path]:
    """A run's sampling weights (sampling_file), a LoRA run's merged into its base: (state dict, the base, the
    file read)."""
    path = sampling_file(run_dir, ema)
    weights, base = run_weights(run_dir, cfg, build_model(cfg.model), path)
    return weights, base, path


def sampling_base(run_dir: Path, cfg, ema: bool = True) -> Base:
    """The base run_weights gives for a run's sampling weights, without loading them."""
    if cfg.lora.enabled:
        return Base(weights_file(cfg.train.init_from), cfg.lora.base_hash)
    return Base(sampling_file(run_dir, ema))
