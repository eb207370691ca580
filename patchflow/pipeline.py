"""Load a run and sample from it: noise -> sampler(model, guidance) -> images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from patchflow.config import ConfigError, RunConfig, load_config
from patchflow.flow.guidance import classifier_free
from patchflow.flow.objective import build_objective
from patchflow.models.dit import DiT
from patchflow.train.checkpoint import latest_checkpoint, load_into, load_weights


def build_model(cfg: RunConfig) -> DiT:
    return DiT(cfg.model)


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
    """The trained model of a run directory (EMA weights by default), in eval mode."""
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
             batch_size: int = 64, device: torch.device | None = None, progress: bool = False) -> torch.Tensor:
    """Class-conditional samples (N, C, T, H, W) in data units. Settings default to cfg.sample.

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
        out.append(x.float().cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


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

    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.model, self.cfg = model, cfg

    @classmethod
    def load(cls, run_dir: str | Path, ema: bool = True, device: str = "auto") -> "Pipeline":
        return cls(load(run_dir, ema=ema, device=resolve_device(device)), load_run_config(run_dir))

    def __call__(self, labels=None, *, n: int | None = None, steps: int | None = None, guidance: float | None = None,
                 seed: int | None = None, sampler: str | None = None, output: str = "np", progress: bool = False):
        """labels: an int (repeated n times) or a list of ints. output: 'np' (uint8 array) or 'pil' (list)."""
        if labels is None:
            raise ValueError("pass labels=: an int class or a list of classes")
        if isinstance(labels, int):
            labels = [labels] * (n or self.cfg.sample.n)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        x = generate(self.model, self.cfg, labels, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                     progress=progress)
        images = to_uint8(x)[:, 0]  # images are the first (only) frame
        if output == "pil":
            from PIL import Image

            return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
        if output != "np":
            raise ConfigError(f"output must be 'np' or 'pil', got {output!r}")
        return images
