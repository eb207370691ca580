"""Load a run and sample from it: noise -> sampler(model, guidance) -> images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from patchflow.config import ConfigError, RunConfig, load_config
from patchflow.flow.guidance import classifier_free
from patchflow.flow.objective import build_objective
from patchflow.models import build_model
from patchflow.train.checkpoint import latest_checkpoint, load_into, load_weights


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a patchflow run directory: {path} is missing")
    return load_config(path)


def load(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a run directory (EMA weights by default), in eval mode. For a codec run this is the
    training module (codec + discriminator); `patchflow.codecs.load(run_dir)` gives its exported codec."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    name = "ema.safetensors" if ema else "model.safetensors"
    path = run_dir / name
    if not path.is_file():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"{path} is missing and {run_dir}/checkpoints holds no complete checkpoint; "
                                    f"train first (patchflow train ... --out {run_dir})")
        path = ckpt / name
    model = build_model(cfg)
    load_into(model, load_weights(path), source=str(path))
    return model.to(device).eval()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """x: (B, C, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, C)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


@torch.inference_mode()
def generate(model: nn.Module, cfg: RunConfig, labels: torch.Tensor, *, steps: int | None = None,
             guidance: float | None = None, sampler: str | None = None, seed: int | None = None,
             batch_size: int = 64, device: torch.device | None = None, progress: bool = False,
             codec=None) -> torch.Tensor:
    """Class-conditional samples (N, C, T, H, W) in the model's units, or decoded to pixels by `codec` when given.
    Settings default to cfg.sample.

    Noise is drawn on the CPU from `seed`, so the same seed gives the same samples on any device.
    """
    s = cfg.sample
    steps = s.steps if steps is None else steps
    guidance = s.guidance if guidance is None else guidance
    sampler = s.sampler if sampler is None else sampler
    seed = s.seed if seed is None else seed
    m = cfg.model
    if labels.numel() and (labels.min() < 0 or labels.max() >= m.num_classes):
        raise ValueError(f"labels must be in 0..{m.num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    device = device or next(model.parameters()).device
    objective = build_objective(cfg.flow, m.learn_sigma)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), m.in_channels, m.frames, m.input_size, m.input_size, generator=generator)
    step_generator = torch.Generator(device).manual_seed(seed + 1)  # ancestral noise of stochastic samplers
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps * ((len(labels) + batch_size - 1) // batch_size), desc="sampling", unit="step")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(device)
        fn = classifier_free(model, y, torch.full_like(y, m.num_classes), guidance,
                             interval=tuple(s.guidance_interval), t_max=objective.t_max)
        with autocast:  # the model runs in bf16; the sampler's state x stays fp32
            x = objective.sample(fn, noise[i:i + batch_size].to(device), steps, sampler, progress=bar,
                                 generator=step_generator)
        if codec is not None:  # latents -> pixels, in fp32
            x = codec.to(device).decode(x.float())
        out.append(x.float().cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


@torch.inference_mode()
def preview(model: nn.Module, cfg: RunConfig, codec=None, device: torch.device | None = None) -> tuple[np.ndarray, int]:
    """What a run shows while it trains: (uint8 (N, H, W, C) images, images per row).

    A diffusion run: samples, one column per class (decoded by `codec` in a latent run). A codec run: held-out
    items (rows of originals) above their reconstructions; clips show one frame per column.
    """
    if not cfg.is_codec_run:
        m = cfg.model
        rows = max(1, min(10, 100 // m.num_classes))
        x = generate(model, cfg, torch.arange(m.num_classes).repeat(rows), device=device, codec=codec)
        return to_uint8(x)[:, 0], m.num_classes
    from patchflow.data import build_dataset

    try:
        data = build_dataset(cfg.data, "val")
    except ValueError:  # folders have no validation split
        data = build_dataset(cfg.data, "train")
    frames = data[0][0].shape[1]
    n = min(len(data), 10 if frames == 1 else 4)
    x = torch.stack([data[int(i)][0] for i in np.linspace(0, len(data) - 1, n)]).to(device or "cpu")  # spread out
    recon = model.codec.decode(model.codec.encode(x))
    if frames == 1:  # a row of originals, a row of reconstructions
        return to_uint8(torch.cat([x, recon]))[:, 0], n
    pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # clip 0, its reconstruction, clip 1, ...
    images = to_uint8(pairs)  # (2n, T, H, W, C)
    return images.reshape(-1, *images.shape[2:]), frames


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 10, pad: int = 2) -> None:
    """images: uint8 (N, H, W, C) -> one PNG grid, `nrow` images per row."""
    from PIL import Image

    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


class Pipeline:
    """`Pipeline.load("runs/x")(labels=[7, 7, 3], steps=20, guidance=4, seed=0)` -> uint8 (N, H, W, C)."""

    def __init__(self, model: nn.Module, cfg: RunConfig, codec=None):
        self.model, self.cfg, self.codec = model, cfg, codec

    @classmethod
    def load(cls, run_dir: str | Path, ema: bool = True, device: str = "auto") -> "Pipeline":
        """The run's model and its codec (pixels for identity runs)."""
        from patchflow import codecs

        cfg = load_run_config(run_dir)
        if cfg.is_codec_run:
            raise ConfigError(f"{run_dir} is a codec run (it trains an autoencoder, it does not sample); use "
                              f"patchflow.codecs.load({str(run_dir)!r}) to encode and decode with it")
        device = resolve_device(device)
        codec = None if cfg.codec.source == "identity" else codecs.load(run_dir, device=device)
        return cls(load(run_dir, ema=ema, device=device), cfg, codec)

    def __call__(self, labels=None, *, n: int | None = None, steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, sampler: str | None = None, output: str = "np", progress: bool = False):
        """labels: an int (repeated n times) or a list of ints. output: 'np' (uint8 array) or 'pil' (list)."""
        if labels is None:
            raise ValueError("pass labels=: an int class or a list of classes")
        if isinstance(labels, int):
            labels = [labels] * (n or self.cfg.sample.n)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        x = generate(self.model, self.cfg, labels, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                     progress=progress, codec=self.codec)
        images = to_uint8(x)[:, 0]  # images are the first (only) frame
        if output == "pil":
            from PIL import Image

            return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
        if output != "np":
            raise ConfigError(f"output must be 'np' or 'pil', got {output!r}")
        return images
