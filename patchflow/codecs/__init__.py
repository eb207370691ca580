"""Codecs: pixels <-> latents. `load(spec)` gives one from a name or a directory.

Specs:
- "identity": pixels are the latents.
- a patchflow codec directory: `codec.json` + `codec.safetensors` (written by a codec run, `<run>/codec/`).
- a run directory: the codec that run trained (a codec run) or used (a latent diffusion run), from `<run>/codec/`.
- a directory saved by diffusers: an `AutoencoderKL` or `AutoencoderKLWan` (`config.json` +
  `diffusion_pytorch_model.safetensors`), or a pipeline folder holding one in `vae/`.
- the name of a shipped codec preset ("codec-digits"): the codec that preset trains, from the local cache
  ($PATCHFLOW_CACHE/codecs); `patchflow train` trains it first when it is not there yet.
"""
from __future__ import annotations

import json
from pathlib import Path

from patchflow.codecs.base import Codec, CodecError, IdentityCodec

__all__ = ["Codec", "CodecError", "IdentityCodec", "load", "save", "CODEC_FILES"]

CODEC_FILES = ("codec.json", "codec.safetensors")
FORMAT = "patchflow-codec"
FORMAT_VERSION = 1


def save(codec: Codec, directory: str | Path, extra: dict | None = None) -> Path:
    """Write a patchflow codec directory (codec.json + codec.safetensors), each file atomically."""
    from patchflow.weights import atomic_save_safetensors, atomic_write_text, state_dict_for_save

    from patchflow.codecs.autoencoder import KLAutoencoder

    if not isinstance(codec, KLAutoencoder):
        raise CodecError(f"only patchflow's own codecs are saved as codec directories, not {codec.kind!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state_dict_for_save(codec), d / "codec.safetensors")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": codec.kind, "version": codec.version,
            "config": codec.config_dict(), "shift": codec.latent_shift.tolist(), "scale": codec.latent_scale.tolist(),
            **(extra or {})}
    atomic_write_text(d / "codec.json", json.dumps(meta, indent=2) + "\n")  # last: its presence marks a whole codec
    return d


def _load_codec_dir(d: Path) -> Codec:
    from patchflow.codecs.autoencoder import AutoencoderConfig, KLAutoencoder
    from patchflow.weights import load_into, load_weights

    missing = [name for name in CODEC_FILES if not (d / name).is_file()]
    if missing:
        raise CodecError(f"codec directory {d} is incomplete: {', '.join(missing)} missing (a codec run writes both "
                         f"at its end; train it to completion or point at another codec)")
    try:
        meta = json.loads((d / "codec.json").read_text())
    except (OSError, ValueError) as e:
        raise CodecError(f"{d / 'codec.json'} is not readable JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CodecError(f"{d / 'codec.json'} is not a patchflow codec description (format {FORMAT!r} expected)")
    for key in ("kind", "config", "shift", "scale"):
        if key not in meta:
            raise CodecError(f"{d / 'codec.json'} lacks the key {key!r}; the file is damaged, export the codec again")
    if meta["kind"] != KLAutoencoder.kind:
        raise CodecError(f"{d / 'codec.json'}: unknown codec kind {meta['kind']!r} (this patchflow knows "
                         f"{KLAutoencoder.kind!r})")
    if meta.get("version") != KLAutoencoder.version:
        raise CodecError(f"{d / 'codec.json'}: codec version {meta.get('version')} was written by another patchflow "
                         f"(this one reads version {KLAutoencoder.version}); retrain the codec")
    from patchflow.checks import ConfigError, build_section

    try:
        cfg = build_section("codec config", AutoencoderConfig, meta["config"])
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise CodecError(f"{d / 'codec.json'}: invalid codec config: {e}") from None
    codec = KLAutoencoder(cfg)
    load_into(codec, load_weights(d / "codec.safetensors"), source=str(d / "codec.safetensors"))
    codec.set_latent_stats(meta["shift"], meta["scale"])
    return codec.eval().requires_grad_(False)


def load(spec: str | Path, device="cpu") -> Codec:
    """A codec in eval mode on `device` from a spec (see the module docstring). Errors are CodecError."""
    text = str(spec).strip()
    if text == "identity":
        return IdentityCodec().to(device)
    path = Path(text).expanduser()
    if path.is_dir():
        codec = _load_dir(path)
    elif path.exists():
        raise CodecError(f"codec {text!r} is a file; give a codec, run or diffusers directory (or 'identity')")
    else:
        from patchflow.codecs.presets import cached_codec_dir, is_codec_preset

        if not is_codec_preset(text):
            from patchflow.codecs.presets import codec_preset_names

            raise CodecError(f"codec {text!r} not found: give 'identity', a shipped codec preset "
                             f"({', '.join(codec_preset_names())}), or an existing codec / run / diffusers directory")
        d = cached_codec_dir(text)
        if not (d / "codec" / "codec.json").is_file():
            raise CodecError(f"codec preset {text!r} is not trained on this machine yet ({d} holds none): run "
                             f"`patchflow train {text}`, or train a preset that uses it (it trains the codec first)")
        codec = _load_codec_dir(d / "codec")
    return codec.to(device)


def _load_dir(path: Path) -> Codec:
    if (path / "codec.json").exists() or (path / "codec.safetensors").exists():
        return _load_codec_dir(path)
    if (path / "config.toml").is_file():  # a run directory
        if (path / "codec").is_dir():
            return _load_codec_dir(path / "codec")
        from patchflow.config import load_config

        cfg = load_config(path / "config.toml")
        if getattr(cfg.model, "arch", "dit") == "autoencoder":
            raise CodecError(f"the codec run {path} has not exported its codec yet ({path / 'codec'} is missing): "
                             f"finish it with `patchflow train ... --out {path} --resume`")
        if cfg.codec.source == "identity":
            return IdentityCodec()
        try:  # a diffusers codec is not copied into the run: it is read from where codec.source points
            return load(cfg.codec.source)
        except CodecError as e:
            raise CodecError(f"run {path} trains on the codec {cfg.codec.source!r}, which cannot be loaded (and "
                             f"{path / 'codec'} holds no copy): {e}") from None
    if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
        from patchflow.codecs.diffusers import load_diffusers_vae

        return load_diffusers_vae(path)
    raise CodecError(f"{path} is not a codec directory: expected codec.json + codec.safetensors (patchflow), "
                     f"config.toml (a run), or config.json (a diffusers autoencoder)")
