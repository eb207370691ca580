"""Weights on disk: safetensors read and written crash-safe (a temporary name, fsync, rename), strict loading into a
module with a message that names what does not match. The bottom layer for every file of tensors: run
directories, codec directories, converted checkpoints."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely; the message names the file."""


PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def safetensors_files(directory: Path, error: type[Exception] = CheckpointError) -> list[Path]:
    """The safetensors weight files of a transformers model folder (one file, or the shards its index names);
    `error` (the caller's error type) when they are missing or only pickled weights are there."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise error(f"{index} is not a safetensors index ({e}); re-save the model") from None
        for name in shards:
            if not (directory / name).is_file():
                raise error(f"{directory} is incomplete: weight shard {name} (named by {index.name}) is missing; "
                            f"copy it there")
        return [directory / name for name in shards]
    pickled = [name for name in PICKLED if (directory / name).is_file()]
    if pickled:
        raise error(f"{directory} has only pickled weights ({pickled[0]}); patchflow loads safetensors only "
                    f"(unpickling can run code). Convert once in a trusted session: "
                    f"model.save_pretrained({str(directory)!r}) writes model.safetensors")
    raise error(f"{directory} has no weights: model.safetensors (or model.safetensors.index.json with its shards) "
                f"is missing")


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of `paths` (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


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


def _remove_on_os_error(tmp: Path, write) -> None:
    """Run write(); on OSError (disk full, read-only) delete the partial `tmp` and re-raise."""
    try:
        write()
    except OSError:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")

    def write():
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync_file(tmp)

    _remove_on_os_error(tmp, write)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")

    def write():
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _remove_on_os_error(tmp, write)
    os.replace(tmp, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file; anything else (a pickle, a .pt) is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: patchflow reads weights only from .safetensors files (no pickle)")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); refusing to read it") from None


def name_list(keys, limit: int = 8) -> str:
    """'a', 'b' ... and N more: sorted keys for an error message."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def layout_mismatch(found: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], limit: int = 8) -> str:
    """'' when `found` has exactly the expected keys and shapes, else what is missing, unexpected or misshapen."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    wrong = sorted(k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"missing keys: {name_list(missing, limit)}")
    if unexpected:
        parts.append(f"unexpected keys: {name_list(unexpected, limit)}")
    if wrong:
        shown = ", ".join(f"{k!r} is {tuple(found[k].shape)}, expected {tuple(expected[k])}" for k in wrong[:limit])
        parts.append(f"wrong shapes: {shown}" + (f" ... and {len(wrong) - limit} more" if len(wrong) > limit else ""))
    return "; ".join(parts)


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
              only=None) -> None:
    """Strict load with a message that lists what is missing, unexpected or misshapen; `only(key)` restricts it
    to the module's tensors it accepts (the rest stay as they are)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items() if only is None or only(k)}
    problem = layout_mismatch(tensors, want)
    if problem:
        raise ValueError(f"{source} does not match the model config: {problem}")
    module.load_state_dict(tensors, strict=only is None)
