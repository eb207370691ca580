"""The codec side of training: exporting a trained codec with its latent statistics, giving each run its own copy
of its codec, and a video codec run's start from an image codec. Training a shipped codec preset the first time a
run needs it is patchflow.train.run's (ensure_codec), handed in here as `get_codec`."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from patchflow import codecs
from patchflow.codecs import Codec, CodecError
from patchflow.config import ConfigError, RunConfig, load_config

STATS_ITEMS = 2048  # training items the latent mean and std are measured on


def _batches(dataset, limit: int, batch: int = 128):
    n = min(len(dataset), limit)
    for i in range(0, n, batch):
        items = [dataset[j] for j in range(i, min(n, i + batch))]
        yield torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


@torch.no_grad()
def measure_latent_stats(codec: Codec, dataset) -> tuple[list[float], list[float]]:
    """Per-channel (shift, scale) that give the posterior modes of `dataset` zero mean and unit variance."""
    total, sq, count = 0.0, 0.0, 0
    for x, _ in _batches(dataset, STATS_ITEMS):
        mean, _ = codec.encode_moments(x)
        flat = mean.double().transpose(0, 1).reshape(mean.shape[1], -1)
        total, sq, count = total + flat.sum(1), sq + flat.pow(2).sum(1), count + flat.shape[1]
    mu = total / count
    std = (sq / count - mu**2).clamp(min=1e-12).sqrt()
    return mu.tolist(), (1.0 / std).tolist()


@torch.no_grad()
def reconstruction_psnr(codec: Codec, dataset, limit: int = 500) -> float:
    """Mean PSNR (dB, pixels in [-1, 1] -> peak-to-peak 2) of decode(encode(x)) over the first `limit` items."""
    from patchflow.evaluate.codec import psnr

    psnrs = [v for x, _ in _batches(dataset, limit) for v in psnr(codec.decode(codec.encode(x)), x)]
    return float(sum(psnrs) / len(psnrs))


def export_codec(run_dir: str | Path, cfg: RunConfig | None = None) -> Path:
    """Write `<run>/codec/` from a finished codec run: its EMA weights, latent statistics measured on its training
    data, and the held-out reconstruction PSNR."""
    from patchflow.train.codec_model import AutoencoderModel
    from patchflow.data import build_dataset, pixel_shape
    from patchflow.run_dir import load_into, load_weights

    run_dir = Path(run_dir)
    cfg = cfg or load_config(run_dir / "config.toml")
    model = AutoencoderModel(cfg.model)
    load_into(model, load_weights(run_dir / "ema.safetensors"), source=str(run_dir / "ema.safetensors"))
    codec = model.codec.eval().requires_grad_(False)
    shift, scale = measure_latent_stats(codec, build_dataset(cfg.data, "train"))
    codec.set_latent_stats(shift, scale)
    try:
        held_out = build_dataset(cfg.data, "val")
    except ValueError:  # folders have no validation split
        held_out = None
    channels, frames, size = pixel_shape(cfg.data)
    info = {"trained_by": {"dataset": cfg.data.dataset, "steps": cfg.train.steps},
            "compression": codec.compression((1, channels, frames, size, size))}
    if held_out is not None:
        info["val_psnr_db"] = round(reconstruction_psnr(codec, held_out), 3)
    return codecs.save(codec, run_dir / "codec", extra=info)


def inflation(cfg: RunConfig, get_codec=codecs.load):
    """For a video codec run with model.init_from: a function that starts its AutoencoderModel from that image codec
    (`get_codec(spec)`: patchflow.train.run hands in ensure_codec, which trains a preset not cached yet); None
    otherwise."""
    if not cfg.kind.codec or not cfg.model.init_from:
        return None
    image = get_codec(cfg.model.init_from).cpu()
    return lambda net: net.codec.inflate_from(image)


def codec_for_run(cfg: RunConfig, out: Path, resume: bool, get_codec=codecs.load, main: bool = True) -> Codec:
    """The codec a diffusion run trains in (on the CPU). A run keeps its own copy in `<run>/codec/` (patchflow
    codecs, written by the main process), so resuming and sampling never depend on the cache; a diffusers codec is
    read from codec.source. `get_codec(spec)` loads codec.source (patchflow.train.run: ensure_codec)."""
    own = out / "codec"
    if resume and (own / "codec.json").is_file():
        codec = codecs.load(own)
    else:
        codec = get_codec(cfg.codec.source)
        if main and codec.kind == "kl":
            if own.exists():
                shutil.rmtree(own)
            codecs.save(codec, own)
    check_model_codec(cfg, codec)
    return codec.eval().requires_grad_(False)


def check_model_codec(cfg: RunConfig, codec: Codec) -> None:
    """The model must take what the codec gives for this data: latent channels, latent size, latent frames."""
    from patchflow.data import pixel_shape

    channels, frames, size = pixel_shape(cfg.data)
    m, name = cfg.model, cfg.codec.source
    if cfg.data.dataset == "captions" and m.frames != 1:  # a video model on a captions file: its clips' frames
        frames = cfg.data.frames
    try:
        _, c, t, h, _ = codec.latent_shape((1, channels, frames, size, size))
    except CodecError as e:
        raise ConfigError(f"codec.source = {name!r} cannot take this run's data ({channels} channels, {frames} "
                          f"frame(s), {size}x{size}): {e}") from None
    for key, want, why in (("in_channels", c, f"the codec has {c} latent channels"),
                           ("input_size", h, f"the codec turns {size}x{size} images into {h}x{h} latents"),
                           ("frames", t, f"the codec turns {frames} frame(s) into {t} latent frame(s)")):
        if getattr(m, key) != want:
            raise ConfigError(f"model.{key} = {getattr(m, key)} does not match codec.source = {name!r}: {why}; "
                              f"set model.{key} = {want}")
    if m.input_size % m.patch_size:
        raise ConfigError(f"model.patch_size = {m.patch_size} does not divide the {h}x{h} latents")
