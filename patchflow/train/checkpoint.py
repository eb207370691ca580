"""Checkpoints: weights in safetensors, training state loaded with weights_only, crash-safe writes.

Layout of a run directory:
  config.toml  model.safetensors  ema.safetensors  log.jsonl  samples/
  checkpoints/step_0000500/{model,ema}.safetensors + state.pt
  checkpoints/latest   (text: the newest complete checkpoint's folder name, written last)
A checkpoint folder is written under a temporary name, fsynced and renamed, so one that exists is complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def state_dict_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model, ema, state: dict, keep: int = 0) -> Path:
    """Write checkpoints/step_N atomically, point `latest` at it, refresh the run's top-level weights."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"{STEP_PREFIX}{step:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_sd, ema_sd = state_dict_for_save(model), state_dict_for_save(ema)
    save_file(model_sd, str(tmp / "model.safetensors"))
    save_file(ema_sd, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", name + "\n")
    atomic_save_safetensors(model_sd, Path(run_dir) / "model.safetensors")
    atomic_save_safetensors(ema_sd, Path(run_dir) / "ema.safetensors")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, or the newest complete step folder if the pointer is missing."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.pt").is_file():
            return candidate
    complete = [p for p in list_checkpoints(run_dir) if (p / "state.pt").is_file()]
    return complete[-1] if complete else None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: patchflow reads weights only from .safetensors files (no pickle)")
    return load_file(str(path))


def load_state(path: Path) -> dict:
    """Training state, read without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load with a message that lists what is missing or unexpected."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                                                       for k in wrong[:5]))
        raise ValueError(f"{source} does not match the model config: " + "; ".join(parts))
    module.load_state_dict(tensors, strict=True)
