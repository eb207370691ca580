"""Load a run and sample from it: noise -> sampler(model, guidance) -> images."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from patchflow.config import ConfigError, RunConfig, load_config
from patchflow.flow import rectified
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


def sampling_shift(cfg: RunConfig, grid: tuple[int, int, int]) -> float:
    """flow.shift holds at the training size; other sizes scale it by sqrt(tokens / training tokens) (SD3's
    resolution-dependent shift: more noise for more tokens keeps the signal-to-noise ratio per image)."""
    m = cfg.model
    base = m.frames * m.input_size ** 2
    return cfg.flow.shift * rectified.resolution_shift(grid[0] * grid[1] * grid[2], base)


@torch.inference_mode()
def generate(model: nn.Module, cfg: RunConfig, targets, *, conditioning=None, negative=None,
             steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
             seed: int | None = None, batch_size: int = 64, device: torch.device | None = None,
             progress: bool = False, codec=None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Samples (N, C, T, H, W) in the model's units, or decoded to pixels by `codec` when given.

    targets: class labels (N,) for a class run, a list of N prompts for a text run (`conditioning` is the run's
    conditioning step; built when None, which loads a text encoder). negative: a negative prompt (text runs).
    size: (H, W) in the model's units (latents in a latent run); default the training size. Settings default to
    cfg.sample. Noise is drawn on the CPU from `seed`, so the same seed gives the same samples on any device.
    """
    from patchflow.conditioning import build_conditioning

    s = cfg.sample
    steps = s.steps if steps is None else steps
    guidance = s.guidance if guidance is None else guidance
    sampler = s.sampler if sampler is None else sampler
    seed = s.seed if seed is None else seed
    m = cfg.model
    device = device or next(model.parameters()).device
    conditioning = conditioning or build_conditioning(cfg, device)
    if not isinstance(targets, (list, tuple)):
        targets = torch.as_tensor(targets).reshape(-1)
    n = len(targets)
    height, width = size or (m.input_size, m.input_size)
    p = m.patch_size
    if height % p or width % p or height < p or width < p:
        raise ValueError(f"size {height}x{width} must be positive multiples of the patch size {p} (in the model's "
                         f"units)")
    flow = cfg.flow
    if size is not None and flow.objective == "rectified":
        flow = dataclasses.replace(flow, shift=sampling_shift(cfg, (m.frames, height // p, width // p)))
    objective = build_objective(flow, m.learn_sigma)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, m.in_channels, m.frames, height, width, generator=generator)
    step_generator = torch.Generator(device).manual_seed(seed + 1)  # ancestral noise of stochastic samplers
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps * ((n + batch_size - 1) // batch_size), desc="sampling", unit="step")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    for i in range(0, n, batch_size):
        cond, null = conditioning.pair(targets[i:i + batch_size], negative)
        fn = classifier_free(model, cond, null, guidance, interval=tuple(s.guidance_interval), t_max=objective.t_max)
        with autocast:  # the model runs in bf16; the sampler's state x stays fp32
            x = objective.sample(fn, noise[i:i + batch_size].to(device), steps, sampler, progress=bar,
                                 generator=step_generator)
        if codec is not None:  # latents -> pixels, in fp32
            x = codec.to(device).decode(x.float())
        out.append(x.float().cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


def preview_prompts(cfg: RunConfig, n: int = 30) -> list[str]:
    """Fixed prompts a text run shows while it trains: the canonical captions of the first held-out items of a
    built-in world, else the first training captions."""
    from patchflow.data import build_dataset, item_text

    try:
        data = build_dataset(dataclasses.replace(cfg.data, paraphrases=False), "val", text=True)
    except ValueError:  # caption files have no validation split
        data = build_dataset(cfg.data, "train", text=True)
    return [item_text(data, i) for i in range(min(n, len(data)))]


@torch.inference_mode()
def preview(model: nn.Module, cfg: RunConfig, codec=None, device: torch.device | None = None,
            conditioning=None) -> tuple[np.ndarray, int]:
    """What a run shows while it trains: (uint8 (N, H, W, C) images, images per row).

    A class run: samples, one column per class (decoded by `codec` in a latent run). A text run: samples of fixed
    held-out prompts (`preview_prompts`). A codec run: held-out items (rows of originals) above their
    reconstructions; clips show one frame per column.
    """
    if cfg.is_text_run:
        x = generate(model, cfg, preview_prompts(cfg), conditioning=conditioning, device=device, codec=codec)
        return to_uint8(x)[:, 0], 10
    if not cfg.is_codec_run:
        m = cfg.model
        rows = max(1, min(10, 100 // m.num_classes))
        x = generate(model, cfg, torch.arange(m.num_classes).repeat(rows), conditioning=conditioning, device=device,
                     codec=codec)
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
    """A run, ready to sample.

    `Pipeline.load("runs/x")(labels=[7, 7, 3], steps=20, guidance=4, seed=0)` (a class run) or
    `Pipeline.load("runs/t2i")(prompt="a red 7 on a black background, in the center", n=4)` (a text run)
    -> uint8 (N, H, W, C) images.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, codec=None, conditioning=None):
        from patchflow.conditioning import build_conditioning

        self.model, self.cfg, self.codec = model, cfg, codec
        device = next(model.parameters()).device
        self.conditioning = conditioning or build_conditioning(cfg, device)

    @classmethod
    def load(cls, run_dir: str | Path, ema: bool = True, device: str = "auto") -> "Pipeline":
        """The run's model, its codec (pixels for identity runs) and, for a text run, its frozen text encoder."""
        from patchflow import codecs

        cfg = load_run_config(run_dir)
        if cfg.is_codec_run:
            raise ConfigError(f"{run_dir} is a codec run (it trains an autoencoder, it does not sample); use "
                              f"patchflow.codecs.load({str(run_dir)!r}) to encode and decode with it")
        device = resolve_device(device)
        codec = None if cfg.codec.source == "identity" else codecs.load(run_dir, device=device)
        return cls(load(run_dir, ema=ema, device=device), cfg, codec)

    def targets(self, labels=None, prompt=None, n: int | None = None) -> list | torch.Tensor:
        """What to sample, checked: N labels for a class run, N prompts for a text run."""
        n = self.cfg.sample.n if n is None else n
        if self.cfg.is_text_run:
            if labels is not None:
                raise ValueError("this is a text-to-image run: pass prompt= (a string or a list), not labels")
            if prompt is None:
                raise ValueError("pass prompt=: a string (sampled n times) or a list of prompts")
            prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
            for p in prompts:
                if not isinstance(p, str) or not p.strip():
                    raise ValueError(f"prompts must be non-empty text, got {p!r}; for an unconditional sample "
                                     f"use guidance=1 with any prompt")
            return prompts
        if prompt is not None:
            raise ValueError("this is a class-conditional run: pass labels= (class numbers), not a prompt")
        if labels is None:
            raise ValueError("pass labels=: an int class or a list of classes")
        if isinstance(labels, int):
            labels = [labels] * n
        return torch.as_tensor(labels, dtype=torch.long).reshape(-1)

    def __call__(self, labels=None, *, prompt=None, negative_prompt: str | None = None, n: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                 sampler: str | None = None, size: tuple[int, int] | None = None, output: str = "np",
                 progress: bool = False):
        """labels: an int (repeated n times) or a list of ints (class runs). prompt: a string (repeated n times)
        or a list of strings (text runs); negative_prompt replaces the empty prompt of guidance. size: (H, W) in
        pixels, default the training size. output: 'np' (uint8 (N, H, W, C)) or 'pil' (a list of images)."""
        if output not in ("np", "pil"):
            raise ConfigError(f"output must be 'np' or 'pil', got {output!r}")
        if negative_prompt is not None and not self.cfg.is_text_run:
            raise ValueError("negative_prompt needs a text-to-image run; this run is class-conditional")
        targets = self.targets(labels, prompt, n)
        x = generate(self.model, self.cfg, targets, conditioning=self.conditioning, negative=negative_prompt,
                     steps=steps, guidance=guidance, sampler=sampler, seed=seed, progress=progress,
                     codec=self.codec, size=self.model_size(size))
        images = to_uint8(x)[:, 0]  # images are the first (only) frame
        if output == "pil":
            from PIL import Image

            return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
        return images

    def model_size(self, size: tuple[int, int] | None) -> tuple[int, int] | None:
        """A pixel size (H, W) -> the model's units (the codec's latent size); None stays None."""
        if size is None:
            return None
        h, w = (int(v) for v in size)
        if self.codec is None:
            return h, w
        from patchflow.codecs import CodecError

        try:
            return tuple(self.codec.latent_shape((1, self.codec.in_channels or 3, h, w))[-2:])
        except CodecError as e:
            raise ValueError(f"size {h}x{w}: {e}") from None
