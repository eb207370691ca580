"""The run directory, the unit everything exchanges: its config, weights in safetensors, checkpoints (training
state loaded with weights_only) and crash-safe writes. The trainer writes it; sampling, conversion, evaluation,
serving and reports read it without the training package.

Layout of a run directory:
  config.toml  model.safetensors  ema.safetensors  log.jsonl  samples/
  checkpoints/step_0000500/{model,ema}.safetensors + state.pt (+ sharded/: FSDP model and optimizer, DCP)
  checkpoints/latest   (text: the newest complete checkpoint's folder name, written last)

A checkpoint is written into checkpoints/.tmp-step_N, fsynced and renamed to step_N; `latest` is replaced
atomically after that. So a folder named step_N is always complete, and a crash at any moment leaves either the
previous `latest` or the new one. Leftover .tmp-* (a crash mid-write) and .del-* (a crash mid-delete) folders
are never read and are removed by the next save.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from patchflow.weights import (CheckpointError, _fsync_dir, _fsync_file, _remove_on_os_error,  # noqa: F401
                               atomic_save_safetensors, atomic_write_text, layout_mismatch, load_into, load_weights,
                               name_list, state_dict_for_save)

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"
FILES = ("model.safetensors", "ema.safetensors", "state.pt")


def step_of(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX):])


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def _discard(folder: Path) -> None:
    """Rename away first, so a crash mid-delete never leaves a step_N folder with some files missing."""
    trash = folder.with_name(TRASH_PREFIX + folder.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temp and trash folders of a crashed save or prune: never read, so safe to delete."""
    for p in root.iterdir():
        if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _write_folder(folder: Path, model_sd: dict, ema_sd: dict, state: dict, extra: dict | None = None) -> None:
    folder.mkdir(exist_ok=True)  # may already hold the processes' shards
    save_file(model_sd, str(folder / "model.safetensors"))
    save_file(ema_sd, str(folder / "ema.safetensors"))
    for name, tensors in (extra or {}).items():  # training-only weights (REPA's projector): never top-level
        save_file(tensors, str(folder / name))
    torch.save(state, folder / "state.pt")
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            _fsync_file(f)
    for d in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        _fsync_dir(d)


def _together(fn, first_error) -> None:
    """Run fn, then every process learns whether any process failed and raises: a bare barrier would leave the
    others waiting forever for a process that stopped."""
    try:
        fn()
    except Exception as e:
        first_error(e)
        raise
    error = first_error(None)
    if error is not None:
        raise error


def save_checkpoint(run_dir: Path, step: int, model_sd: dict | None, ema_sd: dict | None, state: dict | None,
                    keep: int = 0, keep_every: int = 0, shards=None, main: bool = True,
                    first_error=lambda error: error, extra: dict | None = None) -> Path:
    """Write checkpoints/step_N atomically, point `latest` at it, refresh the run's top-level weights, prune.

    model_sd / ema_sd are full CPU state dicts (needed on the main process only). With several processes every
    process calls this: `shards(folder)` (a collective torch.distributed.checkpoint save of the sharded model and
    optimizer) writes into the temp folder first, then the main process alone writes the rest and renames.
    Between the phases `first_error(error or None)` (distributed.first_error) tells every process about a failure
    anywhere, so all of them raise it. An OSError (disk full, read-only) removes the partial temp folder and
    propagates; `latest` and every complete checkpoint are untouched. Any other crash leaves the temp folder for
    the next save to remove. extra: {file name: state dict} of weights only training needs (REPA's projector),
    written into the checkpoint folder alone, never beside the run's sampling weights.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    name = f"{STEP_PREFIX}{step:07d}"
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"

    def prepare():
        if main:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)

    def publish():
        if main:
            _remove_on_os_error(tmp, lambda: _write_folder(tmp, model_sd, ema_sd, state, extra))
            if final.exists():  # left by a run that crashed after this step; ours replaces it
                _discard(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            atomic_write_text(root / "latest", name + "\n")
            atomic_save_safetensors(model_sd, run_dir / "model.safetensors")
            atomic_save_safetensors(ema_sd, run_dir / "ema.safetensors")
            prune_checkpoints(run_dir, step, keep, keep_every)

    _together(prepare, first_error)
    if shards is not None:
        _together(lambda: _remove_on_os_error(tmp, lambda: shards(tmp / "sharded")), first_error)
    _together(publish, first_error)
    return final


def checkpoints_to_keep(steps: list[int], current: int, keep: int, keep_every: int) -> set[int]:
    """`current`, the newest `keep` up to it (0: all), and every multiple of `keep_every` (0: none)."""
    older = sorted(s for s in steps if s <= current)
    kept = set(older if keep == 0 else older[-keep:]) | {current}
    if keep_every > 0:
        kept |= {s for s in older if s % keep_every == 0}
    return kept  # steps after `current` belong to an abandoned continuation (crash before `latest` moved)


def prune_checkpoints(run_dir: Path, current: int, keep: int = 0, keep_every: int = 0) -> None:
    folders = list_checkpoints(run_dir)
    kept = checkpoints_to_keep([step_of(p) for p in folders], current, keep, keep_every)
    for p in folders:
        if step_of(p) not in kept:
            _discard(p)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                  and p.name[len(STEP_PREFIX):].isdigit())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, or the newest complete step folder if the pointer is missing or stale."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name.startswith(STEP_PREFIX) and "/" not in name and is_complete(root / name):
            return root / name
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    return complete[-1] if complete else None


def _pickle_reason(e: Exception) -> str:
    """The line of torch's weights_only message that names the refused global, without its advice to
    disable weights_only (which would run the file's code)."""
    lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    return lines[0] if lines else "it holds objects other than tensors and plain containers"


def load_state(path: Path) -> dict:
    """Training state, read with weights_only=True: a pickle that would run code is refused, not executed."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load this training state: {_pickle_reason(e)}. patchflow never "
                              f"writes such objects; the file was not made by patchflow or was tampered with") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable training state ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a patchflow training state (no 'step' entry)")
    return state


def load_run_config(run_dir: str | Path):
    """The RunConfig of a run directory (its config.toml), checked like any config."""
    from patchflow.config import load_config

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a patchflow run directory: {path} is missing")
    return load_config(path)
