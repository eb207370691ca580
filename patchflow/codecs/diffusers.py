"""Autoencoders saved by diffusers behind patchflow's codec interface.

- `DiffusersAutoencoderKL`: `diffusers.AutoencoderKL` (SD 1.x/2.x, SDXL, SD3, Flux VAEs): an image codec; clips are
  encoded and decoded frame by frame.
- `DiffusersWanVAE`: `diffusers.AutoencoderKLWan` (Wan 2.1 / 2.2): a causal video codec, T = 1 + 4k frames.
- `load_diffusers_vae(path)`: either, from a `save_pretrained` directory or a pipeline folder holding one in `vae/`.

The normalisation comes from the model's config, so `codec.encode` gives what the matching diffusers pipeline feeds
its transformer and `codec.decode` takes what it returns.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import torch

from patchflow.codecs.base import Codec, CodecError

__all__ = ["DiffusersAutoencoderKL", "DiffusersWanVAE", "load_diffusers_vae", "SUPPORTED_CLASSES"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _json_config(vae) -> dict:
    """The model's config as plain JSON values, without diffusers' bookkeeping keys (`_name_or_path` is the load
    path: it must not change a codec's identity)."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=str))


def _config_given(vae, key: str) -> bool:
    """Whether `key` was in the saved config.json rather than filled in from the class's defaults."""
    return key in vae.config and key not in vae.config.get("_use_default_values", [])


def _check_tiling(tile_size: int | None, tile_overlap: float | None, space_factor: int, kind: str) -> None:
    if tile_size is not None and (tile_size < 2 * space_factor or tile_size % space_factor):
        raise CodecError(f"this {kind} codec downsamples space by {space_factor}: tile_size must be a multiple of "
                         f"{space_factor} and at least {2 * space_factor} pixels, got {tile_size}")
    if tile_overlap is not None and not 0.0 <= tile_overlap < 1.0:
        raise CodecError(f"tile_overlap is the fraction of a tile shared with its neighbour, in [0, 1); "
                         f"got {tile_overlap}")


@contextlib.contextmanager
def _untiled(vae):
    """Encode without tiling: tiled encoding changes the latents, and the codec's identity must not depend on it."""
    tiled = getattr(vae, "use_tiling", False)
    if tiled:
        vae.disable_tiling()
    try:
        yield
    finally:
        if tiled:
            vae.enable_tiling()  # no arguments: the tile sizes set at construction stay


class DiffusersAutoencoderKL(Codec):
    """`diffusers.AutoencoderKL`: images (B, C, H, W) <-> latents (B, c, H / f, W / f), f = 2^(levels - 1).

    Clips (B, C, T, H, W) are coded frame by frame into (B, c, T, H / f, W / f). Normalised latents are
    `(z - shift) * scale`: shift = `shift_factor` (None: 0) and scale = `scaling_factor` (SD: 0, 0.18215; SD3: 0.0609,
    1.5305); a config with per-channel `latents_mean` / `latents_std` (SDXL-style) gives shift = latents_mean and
    scale = scaling_factor / latents_std.

    tiled: decode latents larger than a tile with diffusers' own tiled decoder (overlapping tiles, blended seams), to
    bound memory on large images. Encoding is never tiled. tile_size: the tile in pixels (None: the model's
    `sample_size`); tile_overlap: the fraction of a tile shared with its neighbour (None: diffusers' 0.25).
    """

    kind = "diffusers-kl"
    causal = False
    time_factor = 1

    def __init__(self, vae, tiled: bool = False, tile_size: int | None = None, tile_overlap: float | None = None):
        cfg = vae.config
        if cfg.in_channels != cfg.out_channels:
            raise CodecError(f"this AutoencoderKL encodes {cfg.in_channels}-channel pixels but decodes "
                             f"{cfg.out_channels} channels; a codec must give back the pixels it takes")
        self.in_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.space_factor = 2 ** (len(cfg.block_out_channels) - 1)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:  # SDXL pipelines: (z - mean) * scaling_factor / std
            shift = torch.as_tensor(mean, dtype=torch.float32)
            scale = float(cfg.scaling_factor) / torch.as_tensor(std, dtype=torch.float32)
        else:  # SD / SD3 / Flux pipelines: (z - shift_factor) * scaling_factor
            shift = float(cfg.get("shift_factor") or 0.0)
            scale = float(cfg.scaling_factor)
        super().__init__(shift=shift, scale=scale)
        self.vae = vae
        _check_tiling(tile_size, tile_overlap, self.space_factor, self.kind)
        self.tiled = bool(tiled)
        if self.tiled:
            vae.enable_tiling()  # AutoencoderKL's takes no arguments: its tile sizes are attributes
            if tile_size is not None:
                vae.tile_sample_min_size = int(tile_size)
                vae.tile_latent_min_size = int(tile_size) // self.space_factor
            if tile_overlap is not None:
                vae.tile_overlap_factor = float(tile_overlap)

    @staticmethod
    def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B * T, C, H, W), frames of one clip adjacent."""
        return x.transpose(1, 2).flatten(0, 1)

    @staticmethod
    def _batch_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * T, C, H, W) -> (B, C, T, H, W)."""
        return x.unflatten(0, (batch, -1)).transpose(1, 2)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, T, H, W) in [-1, 1] -> posterior mean and log-variance, each (B, c, T, H / f, W / f)."""
        dtype = self.vae.dtype
        with _untiled(self.vae):
            posterior = self.vae.encode(self._frames_to_batch(x).to(dtype)).latent_dist
        b = x.shape[0]
        return (self._batch_to_frames(posterior.mean, b).to(x.dtype),
                self._batch_to_frames(posterior.logvar, b).to(x.dtype))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, c, T, h, w) unnormalised -> (B, C, T, h * f, w * f), not clamped (as diffusers returns it)."""
        x = self.vae.decode(self._frames_to_batch(z).to(self.vae.dtype)).sample
        return self._batch_to_frames(x, z.shape[0]).to(z.dtype)

    def config_dict(self) -> dict:
        return {"class_name": type(self.vae).__name__, "config": _json_config(self.vae)}


class DiffusersWanVAE(Codec):
    """`diffusers.AutoencoderKLWan`: clips (B, C, 1 + 4k, H, W) <-> latents (B, c, 1 + k, H / f, W / f), f = 8 for
    Wan 2.1 (16 with Wan 2.2's patch size 2). Causal in time: the first frame is encoded on its own, so an image
    (B, C, H, W) is a one-frame clip and encodes to (B, c, H / f, W / f).

    Normalised latents are `(z - latents_mean) / latents_std`, per channel, as the Wan pipelines do.
    tiled / tile_size / tile_overlap: as for `DiffusersAutoencoderKL` (None: diffusers' 256-pixel tiles, 0.25 overlap).
    """

    kind = "diffusers-wan"
    causal = True

    def __init__(self, vae, tiled: bool = False, tile_size: int | None = None, tile_overlap: float | None = None):
        cfg = vae.config
        patch = int(cfg.get("patch_size") or 1)
        downs = list(cfg.temperal_downsample)
        # what the architecture gives: one spatial halving per level but the last, one temporal per True flag
        arch_time, arch_space = 2 ** sum(bool(d) for d in downs), 2 ** len(downs) * patch
        time_f = int(cfg.scale_factor_temporal) if _config_given(vae, "scale_factor_temporal") else arch_time
        space_f = int(cfg.scale_factor_spatial) if _config_given(vae, "scale_factor_spatial") else arch_space
        if (time_f, space_f) != (arch_time, arch_space):
            raise CodecError(f"this AutoencoderKLWan's config says it compresses time by {time_f} and space by "
                             f"{space_f}, but its layers (temperal_downsample={downs}, patch_size={patch}) compress "
                             f"by {arch_time} and {arch_space}; fix scale_factor_temporal / scale_factor_spatial in "
                             f"config.json")
        if time_f != 4:  # diffusers' encoder reads frames in chunks of 1, 4, 4, ...
            raise CodecError(f"AutoencoderKLWan encodes frames in chunks of 4 after the first, so only a temporal "
                             f"compression of 4 is supported; this model's is {time_f} "
                             f"(temperal_downsample={downs})")
        if cfg.in_channels != cfg.out_channels:
            raise CodecError(f"this AutoencoderKLWan encodes {cfg.in_channels} channels but decodes "
                             f"{cfg.out_channels}; a codec must give back the pixels it takes")
        self.in_channels = int(cfg.in_channels) // patch**2  # config counts channels after patchifying
        self.latent_channels = int(cfg.z_dim)
        self.time_factor, self.space_factor = time_f, space_f
        if cfg.get("latents_mean") is None or cfg.get("latents_std") is None:
            raise CodecError("this AutoencoderKLWan's config.json lacks latents_mean / latents_std, which normalise "
                             "its latents; add the values published with the model")
        std = torch.as_tensor(cfg.latents_std, dtype=torch.float32)
        super().__init__(shift=cfg.latents_mean, scale=1.0 / std)
        self.vae = vae
        _check_tiling(tile_size, tile_overlap, space_f, self.kind)
        self.tiled = bool(tiled)
        if self.tiled:
            size = int(tile_size) if tile_size is not None else int(vae.tile_sample_min_height)
            overlap = 0.25 if tile_overlap is None else float(tile_overlap)
            # the stride is divided by the spatial factor in diffusers: keep it a positive multiple of it
            stride = max(space_f, int(size * (1 - overlap)) // space_f * space_f)
            vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size,
                              tile_sample_stride_height=stride, tile_sample_stride_width=stride)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, 1 + 4k, H, W) in [-1, 1] -> posterior mean and log-variance, each (B, c, 1 + k, H / f, W / f)."""
        with _untiled(self.vae):
            posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return posterior.mean.to(x.dtype), posterior.logvar.to(x.dtype)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, c, 1 + k, h, w) unnormalised -> (B, C, 1 + 4k, h * f, w * f), clamped to [-1, 1] by diffusers."""
        return self.vae.decode(z.to(self.vae.dtype)).sample.to(z.dtype)

    def config_dict(self) -> dict:
        return {"class_name": type(self.vae).__name__, "config": _json_config(self.vae)}


SUPPORTED_CLASSES = {"AutoencoderKL": DiffusersAutoencoderKL, "AutoencoderKLWan": DiffusersWanVAE}


def _model_dir(path: Path) -> tuple[Path, dict]:
    """The directory holding the autoencoder's config.json (path itself, or a pipeline's vae/) and that config."""
    if not path.exists():
        raise CodecError(f"diffusers autoencoder directory {path} does not exist; give the folder written by "
                         f"save_pretrained (config.json + {WEIGHTS_NAME}) or a pipeline folder with a vae/ subfolder")
    if not path.is_dir():
        raise CodecError(f"{path} is a file; give the directory holding config.json and {WEIGHTS_NAME} "
                         f"(or a pipeline folder with a vae/ subfolder)")
    if (path / "config.json").is_file():
        model_dir = path
    elif (path / "vae" / "config.json").is_file():
        model_dir = path / "vae"
    else:
        raise CodecError(f"{path} holds no config.json (nor vae/config.json): it is not a diffusers autoencoder; "
                         f"save one with `vae.save_pretrained(dir)` or point at a pipeline folder with a vae/ "
                         f"subfolder")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CodecError(f"{model_dir / 'config.json'} is not readable JSON ({e}); the file is damaged, save the "
                         f"model again") from None
    if not isinstance(config, dict):
        raise CodecError(f"{model_dir / 'config.json'} is not a diffusers model config (a JSON object expected)")
    return model_dir, config


def load_diffusers_vae(path: str | Path, device="cpu", tiled: bool = False, tile_size: int | None = None,
                       tile_overlap: float | None = None) -> Codec:
    """The codec for a diffusers autoencoder directory, in eval mode on `device`, without gradients.

    path: a `save_pretrained` directory (config.json + diffusion_pytorch_model.safetensors) or a pipeline folder
    with one in `vae/`. Only local safetensors weights are read (never pickles, never the hub). Dispatches on
    config.json's `_class_name` (see SUPPORTED_CLASSES). tiled / tile_size / tile_overlap: tiled decoding, see
    `DiffusersAutoencoderKL`. Every failure is a CodecError saying what is wrong.
    """
    model_dir, config = _model_dir(Path(path).expanduser())
    name = config.get("_class_name")
    supported = ", ".join(SUPPORTED_CLASSES)
    if name is None:
        raise CodecError(f"{model_dir / 'config.json'} has no _class_name: not a config saved by diffusers' "
                         f"save_pretrained (supported autoencoders: {supported})")
    if name not in SUPPORTED_CLASSES:
        raise CodecError(f"{model_dir / 'config.json'} describes a {name!r}, which is not a supported autoencoder "
                         f"(supported: {supported}); point at the autoencoder (a pipeline's vae/ folder)")
    if not (model_dir / WEIGHTS_NAME).is_file() and not (model_dir / WEIGHTS_INDEX_NAME).is_file():
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f"only pickled weights ({', '.join(pickles)}) are there, which patchflow does not load; convert them "
                f"with `{name}.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` in a trusted "
                f"environment" if pickles else "save the model with `save_pretrained` or copy the weights next to "
                f"config.json")
        raise CodecError(f"{model_dir} has config.json but no weights file {WEIGHTS_NAME}: {hint}")
    try:
        import diffusers
    except ImportError as e:
        raise CodecError(f"loading {model_dir} needs the diffusers package ({e}); install it with "
                         f"`pip install diffusers`") from None
    model_class = getattr(diffusers, name, None)
    if model_class is None:
        raise CodecError(f"the installed diffusers {diffusers.__version__} has no {name}; upgrade it with "
                         f"`pip install -U diffusers`")
    try:
        vae = model_class.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)  # False: no warning without it
    except Exception as e:  # diffusers raises OSError, ValueError, RuntimeError, ... for a damaged model
        raise CodecError(f"diffusers could not load the {name} in {model_dir}: {type(e).__name__}: {e}") from None
    codec = SUPPORTED_CLASSES[name](vae, tiled=tiled, tile_size=tile_size, tile_overlap=tile_overlap)
    return codec.eval().requires_grad_(False).to(device)
