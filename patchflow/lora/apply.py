"""Adapters at sampling time: adapter files in any format read and written, adapters stacked on a run's sampling
weights (`lora/run.py`; `--lora A.safetensors[:scale]`, `Pipeline.load(RUN, loras=[...])`), and a merged run
directory (`patchflow lora merge`). Merging is exact to float32 rounding and costs nothing per sampling step."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from patchflow.checks import ConfigError
from patchflow.lora.adapters import merge
from patchflow.lora.files import Adapter, adapter_from_config, open_adapter_file, parse_adapter, save_adapter
from patchflow.lora.formats import FORMATS, detect, export, import_adapter
from patchflow.lora.run import Base, lora_base, weights_on
from patchflow.models import build_model
from patchflow.run_dir import load_run_config, load_weights
from patchflow.weights import atomic_save_safetensors, atomic_write_text


def parse_spec(spec) -> tuple[str, float]:
    """'A.safetensors:0.8' -> ('A.safetensors', 0.8); no ':scale' (or a tuple given) keeps it as it is, scale 1."""
    if isinstance(spec, (tuple, list)):
        return str(spec[0]), float(spec[1])
    spec = str(spec)
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass  # a ':' inside the path
    return spec, 1.0


def read(source: str | Path, model_cfg=None) -> Adapter:
    """An adapter from a LoRA run directory (its EMA adapters) or a file in any of FORMATS (a diffusers or kohya
    file is mapped onto `model_cfg`, the model it is applied to)."""
    source = Path(source)
    if source.is_dir():
        cfg = load_run_config(source)
        if not cfg.lora.enabled:
            raise ConfigError(f"--lora {source}: a run directory without adapters (lora.rank = 0); give an "
                              f"adapter file or a LoRA run")
        path = source / "ema.safetensors"
        return adapter_from_config(load_weights(path), cfg.lora, cfg.model.arch)
    weights, meta = open_adapter_file(source)
    fmt = detect(weights)
    if fmt == "patchflow":
        return parse_adapter(weights, meta, source)
    if model_cfg is None:
        raise ConfigError(f"{source} is a {fmt} adapter: it is read onto a model (give the run it is for)")
    return import_adapter(weights, meta, model_cfg, fmt, str(source))


def write(adapter: Adapter, model_cfg, fmt: str, path: str | Path) -> Path:
    """Save an adapter as a patchflow, diffusers or kohya .safetensors file."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown adapter format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "patchflow":
        return save_adapter(adapter, path)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: an adapter file is written as .safetensors")
    tensors, meta = export(adapter, model_cfg, fmt)
    atomic_save_safetensors(tensors, path, metadata=meta)
    return path


def read_for(source, model_cfg, base: Base) -> Adapter:
    """An adapter read for a model standing on `base`; one trained on another base (another arch or weights hash)
    is refused."""
    adapter, arch = read(source, model_cfg), model_cfg.arch
    if adapter.arch and adapter.arch != arch:
        raise ConfigError(f"--lora {source}: an adapter for model.arch = {adapter.arch!r}, this run is {arch!r}")
    if adapter.base_hash and adapter.base_hash != base.sha256():
        raise ConfigError(f"--lora {source}: trained on another base (sha256 {adapter.base_hash[:12]}...), "
                          f"not on {base.path} ({base.digest[:12]}...)")
    return adapter


def add(weights: dict, adapter: Adapter, strength: float, source) -> dict:
    """`weights` with one adapter merged in at `strength`; ConfigError when its shapes are another model's."""
    try:
        return merge(weights, [(adapter.weights, adapter.scale * strength)])
    except ValueError as e:
        raise ConfigError(f"--lora {source}: {e}") from None


def stack(weights: dict, loras, base: Base, model_cfg) -> dict:
    """`weights` with each (source, strength) of `loras` merged in (see read_for for what is refused)."""
    for spec in loras:
        source, strength = parse_spec(spec)
        weights = add(weights, read_for(source, model_cfg, base), strength, source)
    return weights


def merge_run(run_dir: str | Path, loras, out: str | Path) -> Path:
    """A standalone run directory at `out`: RUN's sampling weights with the adapters baked in (EMA and raw weights
    alike), its config with lora.rank = 0, its codec and class names copied."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    if cfg.kind.codec:
        raise ConfigError(f"{run_dir} is a codec run; adapters are for diffusion runs")
    if (out / "config.toml").exists():
        raise FileExistsError(f"{out} already holds a run; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    # adapters are checked against what the EMA weights stand on (the file train.init_from reads), the raw
    # weights included; a LoRA run's base is loaded and hashed once
    base, identity = (lora_base(run_dir, cfg, build_model(cfg.model)) if cfg.lora.enabled
                      else (None, Base(run_dir / "ema.safetensors")))
    for name in ("ema.safetensors", "model.safetensors"):
        path = run_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: train the run first")
        atomic_save_safetensors(stack(weights_on(base, cfg, path), loras, identity, cfg.model), out / name)
    for name in ("codec", "classes.json"):
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, out / name, dirs_exist_ok=True)
        elif (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    merged = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0, base_hash=""))
    atomic_write_text(out / "config.toml", merged.to_toml())
    return out
