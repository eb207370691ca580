"""Load a run and sample from it: noise -> sampler(model, guidance) -> images."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image
import torch
import torch.nn as nn

from patchflow.checks import ConfigError
from patchflow.config import RunConfig
from patchflow.flops import resolve_precision, warn_if_bf16_is_slow
from patchflow.flow import rectified
from patchflow.flow.guidance import classifier_free
from patchflow.flow.noise import frame_noise
from patchflow.edit import default_strength, latent_keep, read_mask
from patchflow.flow.objective import build_objective, edit_steps
from patchflow.media.grids import grid, save_grid  # noqa: F401 - imported from here (cli, trainer, serve)
from patchflow.models import build_model
from patchflow.lora.apply import stack
from patchflow.lora.run import sampling_weights
from patchflow.run_dir import load_into, load_run_config
from patchflow.sample_request import PYTHON, check_request


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu", loras=()) -> nn.Module:
    """The trained model of a run directory (EMA weights by default), in eval mode. For a codec run this is its
    exported codec, as `patchflow.codecs.load(run_dir)` gives it. A LoRA run's model is its base with the adapters
    merged in; `loras`: adapters stacked on top, each "FILE[:scale]" or (file, scale), a file or a LoRA run."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.kind.codec:
        from patchflow import codecs

        return codecs.load(run_dir, device=device)
    weights, base, path = sampling_weights(run_dir, cfg, ema)
    model = build_model(cfg.model)
    load_into(model, stack(weights, loras, base, cfg.model) if loras else weights, source=str(path))
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


class StepCallback:
    """tqdm's update()/close() over a callback(done, total), which the samplers call once a step."""

    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.callback(self.done, self.total)

    def close(self) -> None:
        pass


@torch.inference_mode()
def generate(model: nn.Module, cfg: RunConfig, targets, *, conditioning=None, negative=None,
             steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
             seed: int | None = None, batch_size: int = 64, device: torch.device | None = None,
             progress=False, codec=None, size: tuple[int, int] | None = None, frames: int | None = None,
             context: tuple[torch.Tensor, torch.Tensor] | None = None, init: torch.Tensor | None = None,
             strength: float = 1.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Samples (N, C, T, H, W) in the model's units, or decoded to pixels by `codec` when given.

    progress: False, True (a tqdm bar) or a callback(done, total) called after every sampling step.

    targets: class labels (N,) for a class run, a list of N prompts for a text run (`conditioning` is the run's
    conditioning step; built when None, which loads a text encoder). negative: a negative prompt (text runs).
    size: (H, W) and frames: T in the model's units (latents in a latent run); default the training size.
    Video runs: context = (known (N, C, T, H, W), given (N, T) bool) holds given frames fixed (image-to-video,
    extension). Edits (any run): init (N, C, T, H, W), the encoded input; strength < 1 starts part-way from it
    (SDEdit, 0 returns it) and keep (N, 1 or C, T, H, W) in [0, 1] holds that share of it (inpainting, see
    patchflow.edit). Settings default to cfg.sample. Noise is drawn on the CPU from `seed`, so the same seed gives
    the same samples on any device.
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
    frames = m.frames if frames is None else frames
    p, pt = m.patch_size, getattr(m, "temporal_patch", 1)
    if height % p or width % p or height < p or width < p:
        raise ValueError(f"size {height}x{width} must be positive multiples of the patch size {p} (in the model's "
                         f"units)")
    if frames != m.frames and not cfg.kind.video:
        raise ValueError(f"frames: this {m.arch} model makes {m.frames}-frame samples; other lengths need a video "
                         f"model (model.arch = \"video\")")
    if frames < 1 or frames % pt:
        raise ValueError(f"frames = {frames} (in the model's units) must be a positive multiple of the temporal "
                         f"patch {pt}")
    if context is not None and cfg.flow.objective != "rectified":
        raise ValueError("given frames need a rectified-flow run")
    flow = cfg.flow
    if (size is not None or frames != m.frames) and flow.objective == "rectified":
        flow = dataclasses.replace(flow, shift=sampling_shift(cfg, (frames // pt, height // p, width // p)))
    objective = build_objective(flow, m.learn_sigma)
    generator = torch.Generator().manual_seed(seed)
    noise = frame_noise((n, m.in_channels, frames, height, width), flow.frame_noise, flow.frame_noise_alpha,
                        lambda shape: torch.randn(shape, generator=generator))  # as the model trained on
    for name, given in (("context", context[0] if context is not None else None), ("init", init)):
        if given is not None and tuple(given.shape) != tuple(noise.shape):
            raise ValueError(f"{name} has shape {tuple(given.shape)}, the samples {tuple(noise.shape)}")
    if keep is not None and (keep.ndim != 5 or keep.shape[0] != n or keep.shape[1] not in (1, m.in_channels)
                             or tuple(keep.shape[2:]) != tuple(noise.shape[2:])):
        raise ValueError(f"keep has shape {tuple(keep.shape)}; the samples are {tuple(noise.shape)} (channels 1 or "
                         f"{m.in_channels})")
    step_generator = torch.Generator(device).manual_seed(seed + 1)  # ancestral noise of stochastic samplers
    out = []
    bar = None
    total = edit_steps(steps, strength) * ((n + batch_size - 1) // batch_size)
    if callable(progress):  # a caller's callback(done, total), e.g. a web page's progress bar
        bar = StepCallback(progress, total)
    elif progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="sampling", unit="step")
    if s.precision == "bf16":  # asked for; "auto" takes bf16 only where it measured faster
        warn_if_bf16_is_slow(device, "sample.precision")
    bf16 = resolve_precision(s.precision, device) == "bf16"  # "auto": measured on this device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for i in range(0, n, batch_size):
        part = slice(i, i + batch_size)
        cond, null = conditioning.pair(targets[part], negative)
        fn = classifier_free(model, cond, null, guidance, interval=tuple(s.guidance_interval), t_max=objective.t_max)
        extra = {}
        if context is not None:
            extra["context"] = (context[0][part].to(device), context[1][part].to(device))
        if init is not None:
            extra.update(init=init[part].to(device), strength=strength)
        if keep is not None:
            extra["keep"] = keep[part].to(device)
        with autocast:  # the model runs in bf16; the sampler's state x stays fp32
            x = objective.sample(fn, noise[part].to(device), steps, sampler, progress=bar, generator=step_generator,
                                 **extra)
        if codec is not None:  # latents -> pixels, in fp32
            x = codec.to(device).decode(x.float())
        out.append(x.float().cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


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
    def load(cls, run_dir: str | Path, ema: bool = True, device: str = "auto", loras=()) -> "Pipeline":
        """The run's model, its codec (pixels for identity runs) and, for a text run, its frozen text encoder;
        `loras`: adapters merged into the model (see `load`)."""
        from patchflow import codecs

        cfg = load_run_config(run_dir)
        if cfg.kind.codec:
            check_request(cfg, PYTHON, str(run_dir))  # the codec run's message
        device = resolve_device(device)
        codec = None if cfg.codec.source == "identity" else codecs.load(run_dir, device=device)
        return cls(load(run_dir, ema=ema, device=device, loras=loras), cfg, codec)

    def targets(self, labels=None, prompt=None, n: int | None = None) -> tuple[list | None, list | None]:
        """(labels, prompts) as lists, None where not given; an int label or a string prompt is repeated n times."""
        n = self.cfg.sample.n if n is None else n
        if prompt is not None:
            prompt = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if labels is not None:
            labels = [labels] * n if isinstance(labels, int) else torch.as_tensor(labels).reshape(-1).tolist()
        return labels, prompt

    def __call__(self, labels=None, *, prompt=None, negative_prompt: str | None = None, n: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                 sampler: str | None = None, size: tuple[int, int] | None = None, output: str = "np",
                 progress=False, frames: int | None = None, first_frame=None, extend=None, video=None,
                 strength: float | None = None, keyframe: bool | None = None, init_image=None, mask=None):
        """labels: an int (repeated n times) or a list of ints (class runs). prompt: a string (repeated n times)
        or a list of strings (text runs); negative_prompt replaces the empty prompt of guidance. size: (H, W) in
        pixels, default the training size. output: 'np' (uint8 (N, H, W, C)) or 'pil' (a list of images).
        progress: True (a tqdm bar) or a callback(done, total) after every sampling step.

        Video runs (and class-conditional DiTs on clips, model.frames > 1) return clips, uint8 (N, T, H, W, 3)
        ('pil': a list of lists of frames). frames: T in pixels
        (default the training length). One of: first_frame, an image (H, W, 3) or one per prompt (N, H, W, 3), a
        PIL image or a path (image-to-video: frame 0 given); extend, a clip (K, H, W, 3) or a path (its last frames
        given, the returned clip is the K frames followed by the new ones); video, a clip or a path with strength
        in (0, 1] (SDEdit: how much of the schedule re-runs; 1 ignores the clip). Frames of another size are
        resized with a warning (clip_files.fit_frame). keyframe (default sample.keyframe): text-to-video draws frame
        0 first as a one-frame clip, then animates it.

        Editing (patchflow.edit): init_image, an image (path, PIL or (H, W, 3) / (N, H, W, 3) uint8) to start from
        (image runs; clips give video=), fitted to `size` (default the training size) with a warning; strength in
        [0, 1], how much of the schedule re-runs (0 returns the input's codec round trip, 1 ignores it; default
        edit.DEFAULT_STRENGTH, 1 with a mask); mask (white = redraw; an image, or a clip of one per frame; a list
        gives one per sample): only the masked part is redrawn, the rest held at the input (inpainting,
        outpainting).
        """
        if output not in ("np", "pil"):
            raise ConfigError(f"output must be 'np' or 'pil', got {output!r}")
        labels, prompts = self.targets(labels, prompt, n)
        check_request(self.cfg, PYTHON, "this run", labels=labels, prompts=prompts, negative=negative_prompt,
                      sampler=sampler, frames=frames, first_frame=first_frame, extend=extend, video=video,
                      strength=strength, init_image=init_image, mask=mask, steps=steps)
        strength = default_strength(mask) if strength is None else strength
        targets = prompts if self.cfg.kind.prompts else torch.as_tensor(labels, dtype=torch.long)
        common = dict(conditioning=self.conditioning, negative=negative_prompt, steps=steps, guidance=guidance,
                      sampler=sampler, seed=seed, progress=progress, codec=self.codec, size=self.model_size(size))
        if not self.is_video:
            if init_image is not None:
                still = self._pixels(init_image, "init_image", self.pixel_size(size), clip=False)[:, None]
                x = to_uint8(self._edited(targets, still, mask, strength, "init_image", common))
            else:
                x = to_uint8(generate(self.model, self.cfg, targets, **common))
            if x.shape[1] > 1:  # a class-conditional DiT on clips (model.frames > 1): whole clips
                return [[Image.fromarray(f) for f in clip] for clip in x] if output == "pil" else x
            images = x[:, 0]  # images are the first (only) frame
            if output == "pil":
                return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
            return images
        keyframe = self.cfg.sample.keyframe if keyframe is None else keyframe
        clips = self._video(targets, common, frames, first_frame, extend, video, strength, size, keyframe, mask)
        if output == "pil":
            return [[Image.fromarray(f) for f in clip] for clip in clips]
        return clips

    # ---- video ---------------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.cfg.kind.video

    def pixel_frames(self, latent_frames: int | None = None) -> int:
        """Pixel frames of `latent_frames` model frames (default the training length)."""
        t = self.cfg.model.frames if latent_frames is None else latent_frames
        return t if self.codec is None else self.codec.pixel_frames(t)

    def latent_frames(self, frames: int, what: str = "frames") -> int:
        """Pixel frames -> the model's frames, checked against the codec and the temporal patch."""
        pt = self.cfg.model.temporal_patch
        if int(frames) != frames or frames < 1:
            raise ValueError(f"{what} must be a positive whole number, got {frames!r}")
        if self.codec is not None and not self.codec.frames_ok(frames):
            ok = [t for t in range(1, 40) if self.codec.frames_ok(t) and self.codec.latent_frames(t) % pt == 0][:5]
            raise ValueError(f"{what} = {frames}: this run's codec takes {', '.join(map(str, ok))}, ... frames "
                             f"(it compresses time by {self.codec.time_factor})")
        t = frames if self.codec is None else self.codec.latent_frames(frames)
        if t % pt:
            raise ValueError(f"{what} = {frames}: the model's tubelets span {pt} frames; use a multiple of {pt}")
        return t

    def pixel_size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        if size is not None:
            return tuple(int(v) for v in size)
        m = self.cfg.model
        if self.codec is None:
            return m.input_size, m.input_size
        return tuple(self.codec.pixel_shape((1, m.in_channels, 1, m.input_size, m.input_size))[-2:])

    def _pixels(self, value, what: str, size: tuple[int, int], clip: bool) -> np.ndarray:
        """A path, PIL image or array -> uint8 (T, H, W, 3) for a clip, (N, H, W, 3) for first frames; resized to
        `size` with a warning."""
        from patchflow.clip_files import fit_frame, read_clip, read_image

        if isinstance(value, (str, Path)):
            value = read_clip(value) if clip else read_image(value)[None]
        elif not isinstance(value, np.ndarray):  # a PIL image
            value = np.asarray(value.convert("RGB"))[None]
        a = np.asarray(value)
        if a.ndim == 3 and not clip and a.shape[-1] in (1, 3, 4):
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"{what}: expected {'a clip (T, H, W, 3)' if clip else 'an image (H, W, 3) or images (N, H, W, 3)'}"
                             f" of uint8 RGB, got shape {a.shape}")
        return np.stack([fit_frame(f, size, name=what) for f in a])

    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (N, T, H, W, 3) -> model inputs (N, C, T', h, w); grey (ITU-R 601 luma) for one-channel runs."""
        device = next(self.model.parameters()).device
        channels = self.cfg.model.in_channels if self.codec is None else self.codec.in_channels
        if channels == 1:
            frames = np.round(frames @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
        x = torch.from_numpy(frames).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        return x if self.codec is None else self.codec.to(device).encode(x)

    def _edited(self, targets, pixels: np.ndarray, mask, strength: float, what: str, common: dict,
                **extra) -> torch.Tensor:
        """The edit of uint8 inputs `pixels` (1 or N, T, H, W, 3) under `mask` -> pixels (N, C, T, H, W) in
        [-1, 1]. Outside the mask the latents are held at the input's; a codec's decoder spills across the mask's
        edge, so there the pixels are the input's round trip too."""
        n = len(targets)
        if len(pixels) not in (1, n):
            raise ValueError(f"{what}: {len(pixels)} inputs for {n} samples; give one, or one per sample")
        z = self._encode(pixels).cpu()
        init, keep = z.expand(n, -1, -1, -1, -1), None
        if mask is not None:
            masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]  # a list: one mask per sample
            if len(masks) not in (1, n):
                raise ValueError(f"mask: {len(masks)} masks for {n} samples; give one, or one per sample")
            redraw = np.stack([read_mask(m, pixels.shape[2:4], pixels.shape[1]) for m in masks])  # (1 or N, T, H, W)
            keep = torch.cat([latent_keep(r, z.shape[2:], self.codec) for r in redraw])
            keep = keep.expand(n, -1, -1, -1, -1)
        x = generate(self.model, self.cfg, targets, init=init, strength=strength, keep=keep, **extra, **common)
        if keep is None or self.codec is None:
            return x
        inside = torch.from_numpy(redraw)[:, None].to(x.dtype)  # (1 or N, 1, T, H, W), pixels
        return inside * x + (1 - inside) * self.codec.decode(z).float().cpu()

    def _video(self, targets, common, frames, first_frame, extend, video, strength, size, keyframe,
               mask) -> np.ndarray:
        n, hw = len(targets), self.pixel_size(size)
        if video is not None:  # SDEdit: the whole clip, partly renoised; a mask redraws only its part
            clip = self._pixels(video, "video", hw, clip=True)
            t = self.latent_frames(len(clip), "the clip's frame count")
            return to_uint8(self._edited(targets, clip[None], mask, strength, "video", common, frames=t))
        frames = self.pixel_frames() if frames is None else frames
        t = self.latent_frames(frames)
        h, w = common["size"] or (self.cfg.model.input_size, self.cfg.model.input_size)
        known = torch.zeros(n, self.cfg.model.in_channels, t, h, w)
        given = torch.zeros(n, t, dtype=torch.bool)
        head = None
        if first_frame is not None:
            still = self._pixels(first_frame, "first_frame", hw, clip=False)
            if len(still) not in (1, n):
                raise ValueError(f"first_frame: {len(still)} images for {n} prompts; give one, or one per prompt")
            z = self._encode(still[:, None]).cpu()  # (1 or N, C, 1, h, w): a still is a one-frame clip
            known[:, :, :1], given[:, 0] = z, True
        elif extend is not None:
            clip = self._pixels(extend, "extend", hw, clip=True)
            keep = min(len(clip), frames - 1)
            pt = self.cfg.model.temporal_patch
            fits = lambda k: (self.codec is None or self.codec.frames_ok(k)) and (  # noqa: E731
                (k if self.codec is None else self.codec.latent_frames(k)) % pt == 0)
            while keep > 0 and not fits(keep):  # whole codec frames and whole tubelets
                keep -= 1
            if keep < 1:
                raise ValueError(f"extend: no frames of the clip fit a {frames}-frame window; ask for more frames")
            z = self._encode(clip[None, len(clip) - keep:]).cpu()
            known[:, :, :z.shape[2]], given[:, :z.shape[2]] = z, True
            head = clip[:len(clip) - keep]
        elif keyframe and t > self.cfg.model.temporal_patch:  # frame 0 as an image (in latents), then animated
            pt = self.cfg.model.temporal_patch
            key = generate(self.model, self.cfg, targets, frames=pt, **{**common, "codec": None, "progress": False})
            known[:, :, :pt], given[:, :pt] = key, True
        x = generate(self.model, self.cfg, targets, frames=t, context=(known, given) if given.any() else None,
                     **common)
        clips = to_uint8(x)
        if head is not None:  # the given clip, then the new frames
            clips = np.concatenate([np.broadcast_to(clip, (n, *clip.shape)), clips[:, keep:]], axis=1)
        return clips

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
