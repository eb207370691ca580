"""`patchflow sample RUN`: its flags, checked before anything loads, then the samples written to --out.

What a run can be asked for is checked by `sample_request.check_request` (the one check the Pipeline and the server
use too); this module adds what only a command line has: flag ranges, --prompts-file, --size, --out's suffix."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from patchflow.config import MAX_SAMPLES
from patchflow.flow.config import samplers_for
from patchflow.sample_request import CLI, check_request

ALL_SAMPLERS = samplers_for("rectified") + samplers_for("ddpm")


def check_sampling_args(args) -> None:
    """Every sampling flag, before anything is loaded: the message names the flag and what is allowed."""
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be in 1..1000, got {args.steps}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and 0 <= args.guidance <= 100):
        raise ValueError(f"--guidance must be a finite number in [0, 100] (1 = no guidance), got {args.guidance}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in 0..2**63-1, got {args.seed}")
    for flag in ("n", "labels_all", "per_class"):  # sample has --n and --labels-all, eval --per-class
        value = getattr(args, flag, None)
        if value is not None and not 1 <= value <= MAX_SAMPLES:
            raise ValueError(f"--{flag.replace('_', '-')} must be in 1..{MAX_SAMPLES}, got {value}")
    if args.sampler is not None and args.sampler not in ALL_SAMPLERS:
        raise ValueError(f"--sampler {args.sampler!r} is not a sampler; choose euler or heun (flow runs), "
                         "ddpm or ddim (diffusion runs)")
    check_device(args.device)


def check_device(name: str) -> None:
    """--device: auto, cpu, or a CUDA device this machine has."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")


def parse_size(text: str | None) -> tuple[int, int] | None:
    """--size HxW (pixels) -> (H, W); None keeps the run's training size."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 8192 for p in parts):
        raise ValueError(f"--size must be HEIGHTxWIDTH in pixels, each 1..8192 (e.g. 32x48), got {text!r}")
    return int(parts[0]), int(parts[1])


def _prompts_file(path: str) -> list[str]:
    """--prompts-file: one prompt a line; blank lines and # lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {str(path)!r} does not exist (a text file, one prompt a line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts-file {str(path)!r} holds no prompts (blank lines and lines starting with # "
                         f"are skipped)")
    return prompts


def _targets(args, cfg) -> tuple[list | None, list | None]:
    """(labels, prompts) the flags ask for, each None when not given."""
    if args.prompts_file is not None and args.prompt is not None:
        raise ValueError("give --prompt or --prompts-file, not both")
    prompts = _prompts_file(args.prompts_file) if args.prompts_file is not None else \
        None if args.prompt is None else [args.prompt] * args.n
    labels = None
    if args.labels_all is not None:
        n = cfg.model.num_classes if cfg.kind.labels else 1
        if args.labels_all * n > MAX_SAMPLES:
            raise ValueError(f"--labels-all {args.labels_all} asks for {args.labels_all * n} samples ({n} "
                             f"classes); at most {MAX_SAMPLES}")
        labels = np.repeat(np.arange(n), args.labels_all).tolist()
    elif args.label is not None:
        labels = [args.label] * args.n
    return labels, prompts


def _check_out(args, cfg, out: Path) -> None:
    clips = cfg.kind.video or cfg.model.frames > 1  # a class-conditional DiT on clips samples clips too
    suffixes = (".gif", ".mp4", ".npz", ".png") if clips else (".png", ".npz")
    if out.suffix.lower() not in suffixes:
        kinds = ".gif or .mp4 (a clip, or a grid of clips), .npz (videos (N,T,H,W,3) and prompts or labels) or " \
                ".png (one row of frames per clip)" if clips else ".png (a grid) or .npz (arrays)"
        raise ValueError(f"--out must end in {kinds}, got {out.name!r}")
    for flag, value in (("--first-frame", args.first_frame), ("--extend", args.extend),
                        ("--video-to-video", args.video_to_video), ("--init-image", args.init_image),
                        ("--mask", args.mask)):
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value!r} does not exist")


def cmd_sample(args) -> None:
    from patchflow.media.grids import save_grid
    from patchflow.pipeline import Pipeline
    from patchflow.run_dir import load_run_config

    check_sampling_args(args)
    out = Path(args.out)
    cfg = load_run_config(args.run_dir)
    inputs = {"frames": args.frames, "first_frame": args.first_frame, "extend": args.extend,
             "video": args.video_to_video, "strength": args.strength, "init_image": args.init_image,
             "mask": args.mask}
    labels, prompts = _targets(args, cfg)
    check_request(cfg, CLI, str(args.run_dir), labels=labels, prompts=prompts, negative=args.negative_prompt,
                  sampler=args.sampler, **inputs)
    _check_out(args, cfg, out)
    size = parse_size(args.size)  # a malformed --size fails before the model is loaded
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.run_dir, ema=not args.no_ema, device=args.device, loras=args.lora)
    images = pipe(labels, prompt=prompts, negative_prompt=args.negative_prompt, steps=args.steps,
                  guidance=args.guidance, seed=args.seed, sampler=args.sampler, progress=not args.quiet, size=size,
                  **{k: v for k, v in inputs.items() if v is not None})
    targets = prompts if cfg.kind.prompts else np.asarray(labels, dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:  # clips (N, T, H, W, 3)
        write_clips(out, images, targets)
    elif out.suffix == ".npz" and cfg.kind.prompts:
        np.savez_compressed(out, images=images, prompts=np.array(targets, dtype=str))
    elif out.suffix == ".npz":
        np.savez_compressed(out, images=images, labels=targets)
    else:
        nrow = cfg.model.num_classes if args.labels_all is not None else min(len(images), 8)
        if args.labels_all is not None:  # one column per class
            images = images.reshape(cfg.model.num_classes, args.labels_all, *images.shape[1:]).swapaxes(0, 1)
            images = images.reshape(-1, *images.shape[2:])
        save_grid(images, out, nrow=nrow)
    print(f"wrote {len(targets)} {'clips' if images.ndim == 5 else 'samples'} to {out} in "
          f"{time.perf_counter() - t0:.1f}s")


def write_clips(out: Path, clips: np.ndarray, targets) -> None:
    """.npz: videos + prompts (or labels (N,) for a class run); .gif/.mp4: the clip, or a grid of clips (4
    across); .png: a row of frames per clip."""
    from patchflow.clip_files import write_clip, write_clips_npz
    from patchflow.media.grids import save_grid

    suffix = out.suffix.lower()
    if suffix == ".npz" and isinstance(targets, np.ndarray):  # a class run's labels
        write_clips_npz(out, clips, labels=targets.astype(np.int64))
    elif suffix == ".npz":
        write_clips_npz(out, clips, prompts=list(targets))
    elif suffix == ".png":
        save_grid(clips.reshape(-1, *clips.shape[2:]), out, nrow=clips.shape[1])
    elif len(clips) == 1:
        write_clip(out, clips[0])
    else:
        save_grid(clips, out, nrow=min(len(clips), 4))
