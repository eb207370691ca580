"""`patchflow train | sample | eval | cache | convert | plan | demo | serve | report`."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np


def cmd_train(args) -> None:
    from patchflow.config import load_config
    from patchflow.train.trainer import train

    cfg = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    train(cfg, out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, say it once
        print(f"run written to {out}")


def _labels_from_args(args, num_classes: int) -> np.ndarray:
    if args.labels_all is not None:
        _check_total("--labels-all", args.labels_all, num_classes)
        return np.repeat(np.arange(num_classes), args.labels_all)
    if args.label is None:
        raise ValueError("say what to sample: --label K (with --n) or --labels-all N")
    if not 0 <= args.label < num_classes:
        raise ValueError(f"--label {args.label} is out of range: this model has classes 0..{num_classes - 1}")
    return np.full(args.n, args.label)


def _check_total(flag: str, per_class: int, num_classes: int) -> None:
    from patchflow.config import MAX_SAMPLES

    if per_class * num_classes > MAX_SAMPLES:
        raise ValueError(f"{flag} {per_class} asks for {per_class * num_classes} samples ({num_classes} classes); "
                         f"at most {MAX_SAMPLES}")


def _check_sampling_args(args) -> None:
    """Every sampling flag, before anything is loaded: the message names the flag and what is allowed."""
    from patchflow.config import MAX_SAMPLES

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
    if args.sampler is not None and args.sampler not in ("euler", "heun", "ddpm", "ddim"):
        raise ValueError(f"--sampler {args.sampler!r} is not a sampler; choose euler or heun (flow runs), "
                         "ddpm or ddim (diffusion runs)")
    _check_device(args.device)


def _check_device(name: str) -> None:
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


def _check_sampler(args, cfg) -> None:
    """--sampler against the run's objective, once its config.toml is read (before the model is loaded)."""
    from patchflow.flow.samplers import SAMPLERS

    allowed = SAMPLERS if cfg.flow.objective == "rectified" else ("ddpm", "ddim")
    if args.sampler is not None and args.sampler not in allowed:
        raise ValueError(f"--sampler {args.sampler!r} is not allowed for a {cfg.flow.objective} run; "
                         f"choose one of: {', '.join(map(repr, allowed))}")


def _prompts_from_args(args, n_flag: str = "--n") -> list[str]:
    """The prompts of a text run's sampling command: --prompt (n times) or --prompts-file (one a line)."""
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ValueError("give --prompt or --prompts-file, not both")
        path = Path(args.prompts_file)
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
    if args.prompt is None:
        raise ValueError(f"say what to sample: --prompt TEXT (with {n_flag}) or --prompts-file FILE")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty; describe the image, e.g. --prompt \"a red 7 on a black background, in "
                         "the center\"")
    return [args.prompt] * args.n


def _sampling_targets(args, cfg) -> np.ndarray | list[str]:
    """Labels for a class run, prompts for a text run; the wrong kind of flag is an error that says which."""
    text_flags = [f for f, v in (("--prompt", args.prompt), ("--prompts-file", args.prompts_file),
                                 ("--negative-prompt", args.negative_prompt)) if v is not None]
    label_flags = [f for f, v in (("--label", args.label), ("--labels-all", args.labels_all)) if v is not None]
    if cfg.is_text_run:
        if label_flags:
            raise ValueError(f"{label_flags[0]} is for class-conditional runs; {args.run_dir} is text-to-image: use "
                             f"--prompt TEXT or --prompts-file FILE")
        return _prompts_from_args(args)
    if text_flags:
        raise ValueError(f"{text_flags[0]} is for text-to-image runs; {args.run_dir} is class-conditional "
                         f"({cfg.model.num_classes} classes): use --label K or --labels-all N")
    return _labels_from_args(args, cfg.model.num_classes)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    """--size HxW (pixels) -> (H, W); None keeps the run's training size."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 8192 for p in parts):
        raise ValueError(f"--size must be HEIGHTxWIDTH in pixels, each 1..8192 (e.g. 32x48), got {text!r}")
    return int(parts[0]), int(parts[1])


def _sample_run(args, targets) -> np.ndarray:
    from patchflow.pipeline import Pipeline

    pipe = Pipeline.load(args.run_dir, ema=not args.no_ema, device=args.device)
    common = dict(steps=args.steps, guidance=args.guidance, seed=args.seed, sampler=args.sampler,
                  progress=not args.quiet, size=_parse_size(getattr(args, "size", None)))
    if pipe.is_video:
        video = dict(frames=args.frames, first_frame=args.first_frame, extend=args.extend,
                     video=args.video_to_video, strength=args.strength)
        return pipe(prompt=list(targets), negative_prompt=args.negative_prompt, **common,
                    **{k: v for k, v in video.items() if v is not None})
    if pipe.cfg.is_text_run:
        return pipe(prompt=list(targets), negative_prompt=getattr(args, "negative_prompt", None), **common)
    return pipe(np.asarray(targets).tolist(), **common)


VIDEO_FLAGS = (("--frames", "frames"), ("--first-frame", "first_frame"), ("--extend", "extend"),
               ("--video-to-video", "video_to_video"))


def _check_video_flags(args, cfg, out: Path) -> None:
    """The video flags against the run and --out, before the model is loaded."""
    video = cfg.model.arch == "video"
    clips = video or cfg.model.frames > 1  # a class-conditional DiT on clips samples clips too
    used = [flag for flag, key in VIDEO_FLAGS if getattr(args, key, None) is not None]
    if args.strength is not None:
        used.append("--strength")
    if used and not video:
        raise ValueError(f"{used[0]} is for video runs (model.arch = \"video\"); {args.run_dir} is not one")
    suffixes = (".gif", ".mp4", ".npz", ".png") if clips else (".png", ".npz")
    if out.suffix.lower() not in suffixes:
        kinds = ".gif or .mp4 (a clip, or a grid of clips), .npz (videos (N,T,H,W,3) and prompts or labels) or " \
                ".png (one row of frames per clip)" if clips else ".png (a grid) or .npz (arrays)"
        raise ValueError(f"--out must end in {kinds}, got {out.name!r}")
    if not video:
        return
    sources = [flag for flag in ("--first-frame", "--extend", "--video-to-video")
               if getattr(args, flag[2:].replace("-", "_")) is not None]
    if len(sources) > 1:
        raise ValueError(f"give one of --first-frame, --extend and --video-to-video, not {' and '.join(sources)}")
    if args.strength is not None and args.video_to_video is None:
        raise ValueError("--strength goes with --video-to-video CLIP (how much of the clip is redrawn)")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1] (1 redraws everything), got {args.strength}")
    if args.frames is not None and not 1 <= args.frames <= 1024:
        raise ValueError(f"--frames must be in 1..1024, got {args.frames}")
    if args.frames is not None and args.video_to_video is not None:
        raise ValueError("--frames does not go with --video-to-video: the clip's own length is kept")
    for flag in sources:
        path = Path(getattr(args, flag[2:].replace("-", "_")))
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {str(path)!r} does not exist")


def cmd_sample(args) -> None:
    from patchflow.pipeline import load_run_config, save_grid

    _check_sampling_args(args)
    out = Path(args.out)
    cfg = load_run_config(args.run_dir)
    if cfg.is_codec_run:
        raise ValueError(f"{args.run_dir} is a codec run: it encodes and decodes, it does not sample; score it with "
                         f"`patchflow eval {args.run_dir}` or use patchflow.codecs.load({str(args.run_dir)!r})")
    _check_video_flags(args, cfg, out)
    _check_sampler(args, cfg)
    _parse_size(args.size)  # a malformed --size fails before the model is loaded
    targets = _sampling_targets(args, cfg)
    t0 = time.perf_counter()
    images = _sample_run(args, targets)
    out.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 5:  # clips (N, T, H, W, 3)
        _write_clips(out, images, targets)
    elif out.suffix == ".npz" and cfg.is_text_run:
        np.savez_compressed(out, images=images, prompts=np.array(targets, dtype=str))
    elif out.suffix == ".npz":
        np.savez_compressed(out, images=images, labels=targets.astype(np.int64))
    else:
        nrow = cfg.model.num_classes if args.labels_all is not None else min(len(images), 8)
        if args.labels_all is not None:  # one column per class
            images = images.reshape(cfg.model.num_classes, args.labels_all, *images.shape[1:]).swapaxes(0, 1)
            images = images.reshape(-1, *images.shape[2:])
        save_grid(images, out, nrow=nrow)
    print(f"wrote {len(targets)} {'clips' if images.ndim == 5 else 'samples'} to {out} in "
          f"{time.perf_counter() - t0:.1f}s")


def _write_clips(out: Path, clips: np.ndarray, prompts) -> None:
    """.npz: videos + prompts (or labels (N,) for a class run); .gif/.mp4: the clip, or a grid of clips (4 across); .png: a row of frames per clip."""
    from patchflow.clip_files import write_clip, write_clips_npz
    from patchflow.pipeline import save_grid

    suffix = out.suffix.lower()
    if suffix == ".npz" and isinstance(prompts, np.ndarray):  # a class run's labels
        write_clips_npz(out, clips, labels=prompts.astype(np.int64))
    elif suffix == ".npz":
        write_clips_npz(out, clips, prompts=list(prompts))
    elif suffix == ".png":
        save_grid(clips.reshape(-1, *clips.shape[2:]), out, nrow=clips.shape[1])
    elif len(clips) == 1:
        write_clip(out, clips[0])
    else:
        save_grid(clips, out, nrow=min(len(clips), 4))


def cmd_eval(args) -> None:
    from patchflow.evaluate.digits import evaluate_samples

    _check_sampling_args(args)
    src = Path(args.source)
    if src.suffix == ".npz":
        try:
            f = np.load(src)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a folder, not a zip, pickled data
            raise ValueError(f"{src}: not a readable .npz file ({(str(e).splitlines() or [type(e).__name__])[0]})") \
                from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(f"{src}: not a readable .npz file (it holds one array; images and labels are needed)")
        with f:
            if "videos" in f.files:  # clips of a video run: prompt following per clip
                return _eval_clips_npz(args, src)
            if "prompts" in f.files:  # samples of a text run: prompt following
                return _eval_prompts_npz(args, src)
            missing = {"images", "labels"} - set(f.files)
            if missing:
                raise ValueError(f"{src} lacks {sorted(missing)}; patchflow sample --out x.npz writes images and "
                                 f"labels (class runs) or images and prompts (text runs)")
            images, labels = f["images"], f["labels"]
    else:
        from patchflow.pipeline import load_run_config

        cfg = load_run_config(src)
        if cfg.is_codec_run:
            return _eval_codec(args, src, cfg)
        if cfg.model.arch == "video":
            return _eval_video(args, src, cfg)
        if cfg.is_text_run:
            return _eval_text(args, src, cfg)
        if cfg.data.dataset != "digits":
            raise ValueError(f"patchflow eval scores runs of the built-in digits world; {src} trains on {cfg.data.dataset}")
        _check_sampler(args, cfg)
        _check_total("--per-class", args.per_class, cfg.model.num_classes)
        args.run_dir, args.label = src, None
        labels = np.repeat(np.arange(cfg.model.num_classes), args.per_class)
        images = _sample_run(args, labels)
    result = evaluate_samples(images, labels)
    print(f"samples: {result['n']}")
    print(f"class accuracy: {result['accuracy']:.4f}   (classifier on real validation digits: "
          f"{result['classifier_val_accuracy']:.4f})")
    print(f"Frechet distance (classifier features): {result['fd']:.3f}   (real-data ceiling: {result['fd_real']:.3f})")
    _write_json(args, result)


def _write_json(args, result) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _eval_prompts_npz(args, src: Path) -> None:
    """An .npz of a text run's samples (images, prompts): how often each shows what its prompt asked."""
    from patchflow.evaluate import prompts

    _print_npz_report(args, src, prompts)


def _eval_clips_npz(args, src: Path) -> None:
    """An .npz of a video run's clips (videos, prompts): digit, colours and motion per clip (evaluate.clips)."""
    from patchflow.evaluate import clips

    _print_npz_report(args, src, clips)


def _print_npz_report(args, src: Path, scorer) -> None:
    """scorer: evaluate.prompts or evaluate.clips (score_npz, format_report)."""
    report = scorer.score_npz(src)
    print(scorer.format_report(report))
    _write_json(args, report.as_dict())


def _eval_world_run(args, src: Path, cfg, *, world: str, what: str, limit: int, curve, score) -> None:
    """What text and video runs share: the run must train on `world`, --prompts be in 1..limit; then the learning
    curve (curve(n) -> (rows, printed table)) or score(pipe, n) -> the figures, printed by score, JSON-able."""
    from patchflow.pipeline import Pipeline

    if cfg.data.dataset != world:
        raise ValueError(f"patchflow eval scores {what} of the built-in {world} world; {src} trains on "
                         f"{cfg.data.dataset} (sample it with --prompts-file --out samples.npz and score that)")
    _check_sampler(args, cfg)
    n = args.prompts
    if not 1 <= n <= limit:
        raise ValueError(f"--prompts must be in 1..{limit} (the held-out items), got {n}")
    if args.curve:
        rows, table = curve(n)
        if not rows:
            raise ValueError(f"{src}/checkpoints holds no checkpoint to score")
        print(table)
        _write_json(args, rows)
    else:
        _write_json(args, score(Pipeline.load(src, ema=not args.no_ema, device=args.device), n))


def _eval_video(args, src: Path, cfg) -> None:
    """A moving-digits video run: text-to-video on held-out prompts beside the real held-out clips, and
    image-to-video from real held-out first frames; with --curve the learning curve over kept checkpoints."""
    from patchflow.evaluate import video_run
    from patchflow.evaluate.clips import RATES
    from patchflow.evaluate.text_run import format_curve

    frames = args.frames or video_run.FRAMES

    def curve(n):
        rows = video_run.learning_curve(src, n=n, seed=args.seed, frames=frames, steps=args.steps,
                                        guidance=args.guidance, sampler=args.sampler)
        return rows, format_curve(rows, RATES)

    _eval_world_run(args, src, cfg, world="moving-digits", what="video runs", limit=500, curve=curve,
                    score=lambda pipe, n: _score_video(pipe, n, frames, args.seed, args.steps, args.guidance,
                                                       not args.quiet, args.sampler))


def _score_video(pipe, n: int, frames: int, seed: int, steps, guidance, progress: bool, sampler=None) -> dict:
    """Text-to-video on n held-out prompts and image-to-video on n // 2 held-out first frames, printed; the
    figures as a dict (clips left out)."""
    from patchflow.evaluate import video_run

    t2v = video_run.text_to_video(pipe, n, seed=seed, frames=frames, steps=steps, guidance=guidance,
                                  progress=progress, sampler=sampler)
    print(f"\ntext-to-video, {n} held-out prompts, {frames} frames; model vs real held-out clips:\n{t2v['table']}")
    i2v = video_run.image_to_video(pipe, max(1, n // 2), seed=seed + 1, frames=frames, steps=steps,
                                   guidance=guidance, progress=progress, sampler=sampler)
    print(f"\nimage-to-video from {max(1, n // 2)} real held-out first frames: frame 0 mean absolute error "
          f"{i2v['first_frame_mae']:.2f}/255\n{i2v['table']}")
    drop = ("clips", "prompts")
    return {"text_to_video": {k: v for k, v in t2v.items() if k not in drop},
            "image_to_video": {k: v for k, v in i2v.items() if k not in drop}, "frames": frames}


def _eval_text(args, src: Path, cfg) -> None:
    """A color-digits text run: prompt following on held-out prompts (canonical, paraphrased, numbers) beside the
    real held-out images, or with --curve the learning curve over the run's kept checkpoints."""
    from patchflow.evaluate.text_run import evaluate_pipeline, format_curve, learning_curve

    def curve(n):
        rows = learning_curve(src, n=n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              sampler=args.sampler)
        return rows, format_curve(rows)

    def score(pipe, n):
        sets = {"canonical": n, "paraphrase": max(1, n * 3 // 5), "number": min(239, max(1, n * 2 // 5))}
        result = evaluate_pipeline(pipe, sets, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                   progress=not args.quiet, sampler=args.sampler)
        for kind, r in result.items():
            print(f"\n{kind} prompts ({r['model']['n']}), model vs real held-out images:\n{r['table']}")
        return result

    _eval_world_run(args, src, cfg, world="color-digits", what="prompt following", limit=1000, curve=curve,
                    score=score)


def _eval_codec(args, src: Path, cfg) -> None:
    """A codec run: reconstruction PSNR, compression, digit accuracy before/after, colours (evaluate.codec)."""
    from patchflow import codecs
    from patchflow.config import WORLDS
    from patchflow.evaluate.codec import evaluate_codec

    if cfg.data.dataset not in WORLDS:
        raise ValueError(f"patchflow eval scores codecs of the built-in worlds ({', '.join(WORLDS)}); {src} trains "
                         f"on {cfg.data.dataset}")
    r = evaluate_codec(codecs.load(src), cfg.data.dataset, n=args.per_class * 5, frames=cfg.data.frames)
    print(f"{r['world']}: {r['n']} held-out items" + (f" of {r['frames']} frames" if r.get("frames", 1) > 1 else ""))
    print(f"reconstruction PSNR {r['psnr_db']:.2f} dB, compression {r['compression']:.1f}x (pixel values per "
          f"latent value)")
    print(f"digit accuracy: originals {r['accuracy_original']:.4f}, reconstructions {r['accuracy_reconstructed']:.4f}")
    if "stroke_rgb_error" in r:
        print(f"colours: mean RGB error {r['stroke_rgb_error']:.1f} on strokes, {r['background_rgb_error']:.1f} on "
              f"backgrounds; named colour kept {r['stroke_color_kept']:.4f} (digit), "
              f"{r['background_color_kept']:.4f} (background)")
    _write_json(args, r)


def cmd_convert(args) -> None:
    from patchflow.convert.dit import convert_diffusers_dit, convert_official_dit

    if args.num_heads is not None and args.num_heads < 1:
        raise ValueError(f"--num-heads must be >= 1, got {args.num_heads}")
    if args.num_heads is not None and args.kind != "dit-official":
        raise ValueError(f"--num-heads is for dit-official checkpoints; {args.kind} reads the heads from config.json")
    if args.pipeline is not None and args.kind != "diffusers-sd3":
        raise ValueError(f"--pipeline is for diffusers-sd3 imports; {args.kind} takes no text encoders or VAE")
    if args.kind in ("diffusers-sd3", "to-diffusers-sd3"):
        from patchflow.convert.sd3 import export_diffusers_sd3, import_diffusers_sd3

        if args.kind == "diffusers-sd3":
            print(f"wrote run directory {import_diffusers_sd3(args.source, args.out_dir, pipeline=args.pipeline)}")
        else:
            print(f"wrote diffusers SD3Transformer2DModel folder {export_diffusers_sd3(args.source, args.out_dir)}")
        return
    if args.kind == "dit-official":
        out = convert_official_dit(args.source, args.out_dir, num_heads=args.num_heads)
    else:
        out = convert_diffusers_dit(args.source, args.out_dir)
    print(f"wrote run directory {out}")


def cmd_cache(args) -> None:
    from patchflow.config import ConfigError, load_config
    from patchflow.data.latent_cache import CacheError, build_cache, check_cache, default_cache_dir, shapes_text
    from patchflow.train.codec import check_model_codec, ensure_codec

    cfg = load_config(args.config, args.set)
    if cfg.is_codec_run:
        raise ConfigError(f"{args.config} trains a codec on pixels; `patchflow cache` takes the config of a run "
                          f"that trains on a codec's latents (codec.source set)")
    if cfg.codec.source == "identity":
        raise ConfigError(f"{args.config} has codec.source = \"identity\": it trains on pixels, which need no "
                          f"cache; set codec.source to a codec (e.g. --set codec.source=\"codec-digits\")")
    codec = ensure_codec(cfg.codec.source, progress=not args.quiet)
    check_model_codec(cfg, codec)
    setting = cfg.codec.cache.strip()
    if args.out:
        directory = Path(args.out)
    elif setting not in ("auto", "off"):
        directory = Path(setting).expanduser()
    else:
        directory = default_cache_dir(cfg.data, codec.identity())
    if (directory / "cache.json").is_file() and not args.force:
        try:
            meta = check_cache(directory, cfg.data, codec.identity())
            print(f"latent cache {directory} is up to date ({meta['items']} items, latents "
                  f"{shapes_text(meta)}); --force rebuilds it")
            return
        except CacheError as e:
            print(f"rebuilding: {e}")
    t0 = time.perf_counter()
    build_cache(directory, cfg.data, codec, progress=not args.quiet)
    meta = check_cache(directory, cfg.data, codec.identity())
    print(f"wrote {meta['items']} latents {shapes_text(meta)} of {cfg.data.dataset} to {directory} in "
          f"{time.perf_counter() - t0:.1f}s")
    if setting == "off":
        print("note: this config has codec.cache = \"off\"; set codec.cache = \"auto\" or the folder to use it")


def cmd_plan(args) -> None:
    from patchflow.config import load_config
    from patchflow.plan import format_plan, make_plan, parse_memory

    memory = parse_memory(args.memory) if args.memory else None
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if any(not 1 <= b <= 2**31 for b in args.batch):
        raise ValueError(f"--batch sizes must be in 1..2**31, got {args.batch}")
    cfg = load_config(args.config, args.set)
    if cfg.is_codec_run:
        raise ValueError(f"patchflow plan sizes diffusion transformers; {args.config} trains a codec "
                         f"(model.arch = \"autoencoder\")")
    print(format_plan(cfg, make_plan(cfg), memory, args.batch, args.checkpoint_every))


def _demo_train(args, preset: str, default_out: str):
    """Train a demo preset into --out; returns (config, run directory, its Pipeline, start time)."""
    from patchflow.config import load_config
    from patchflow.pipeline import Pipeline
    from patchflow.train.trainer import train

    out = Path(args.out or default_out)
    cfg = load_config(preset, args.set)
    t0 = time.perf_counter()
    train(cfg, out, resume=args.resume, progress=not args.quiet)
    print(f"trained in {time.perf_counter() - t0:.0f}s")
    return cfg, out, Pipeline.load(out, device="cpu"), t0


def cmd_demo(args) -> None:
    if args.world == "color-digits":
        return _demo_color_digits(args)
    if args.world == "moving-digits":
        return _demo_moving_digits(args)
    from patchflow.evaluate.digits import evaluate_samples
    from patchflow.pipeline import save_grid

    cfg, out, pipe, t0 = _demo_train(args, "digits", "runs/demo")
    per_class = 10
    grid_labels = np.tile(np.arange(cfg.model.num_classes), per_class)
    save_grid(pipe(grid_labels.tolist(), seed=0), out / "demo_grid.png", nrow=cfg.model.num_classes)
    labels = np.repeat(np.arange(cfg.model.num_classes), 50)
    result = evaluate_samples(pipe(labels.tolist(), seed=1), labels)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"sample grid: {out / 'demo_grid.png'}")
    print(f"class accuracy {result['accuracy']:.4f} at {cfg.sample.steps} {cfg.sample.sampler} steps, "
          f"guidance {cfg.sample.guidance}; Frechet distance {result['fd']:.3f} (real-data ceiling {result['fd_real']:.3f})")
    print(f"done in {time.perf_counter() - t0:.0f}s")


def demo_prompts() -> list[str]:
    """The color-digits demo grid: digits 0-9 across, one row per (colour, background, position), then numbers."""
    from patchflow.data.color_digits import POSITION_PHRASES
    from patchflow.data.worlds import article

    rows = [("red", "black", "centre"), ("white", "blue", "left"), ("yellow", "magenta", "right"),
            ("cyan", "red", "top"), ("orange", "gray", "bottom"), ("green", "white", "centre"),
            ("blue", "yellow", "centre"), ("black", "cyan", "left")]
    prompts = [f"{article(c)} {c} {d} on {article(b)} {b} background, {POSITION_PHRASES[p]}"
               for c, b, p in rows for d in range(10)]
    return prompts + [f"the number {n} in {c} on {article(b)} {b} background"
                      for n, (c, b) in zip((10, 23, 42, 57, 68, 71, 85, 99, 36, 14),
                                           [("white", "black"), ("yellow", "blue"), ("green", "gray"),
                                            ("red", "white"), ("magenta", "green"), ("cyan", "black"),
                                            ("orange", "blue"), ("black", "yellow"), ("blue", "white"),
                                            ("white", "red")])]


def _demo_color_digits(args) -> None:
    """Train the color-digits text-to-image preset (its codec first when none is cached), write a sample grid, and
    score prompt following on held-out prompts beside the real images."""
    from patchflow.evaluate.text_run import evaluate_pipeline
    from patchflow.pipeline import save_grid

    cfg, out, pipe, t0 = _demo_train(args, "color-digits", "runs/demo-color-digits")
    save_grid(pipe(prompt=demo_prompts(), seed=0), out / "demo_grid.png", nrow=10)
    result = evaluate_pipeline(pipe, seed=1, progress=not args.quiet)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"sample grid: {out / 'demo_grid.png'} (rows: prompts in demo_prompts(), digits 0-9 across)")
    for kind, r in result.items():
        print(f"\n{kind} held-out prompts, {cfg.sample.steps} {cfg.sample.sampler} steps, guidance "
              f"{cfg.sample.guidance}; model vs real images:\n{r['table']}")
    print(f"\ndone in {time.perf_counter() - t0:.0f}s")


def demo_video_prompts() -> list[str]:
    """The moving-digits demo grid: one clip per digit, directions and colours varied."""
    from patchflow.data.worlds import article

    looks = [("red", "black"), ("white", "blue"), ("yellow", "magenta"), ("cyan", "red"), ("orange", "gray"),
             ("green", "white"), ("blue", "yellow"), ("black", "cyan"), ("magenta", "green"), ("gray", "white")]
    moves = ("left", "right", "up", "down")
    return [f"{article(c)} {c} {d} moving {moves[d % 4]} on {article(b)} {b} background"
            for d, (c, b) in enumerate(looks)] + \
        [f"{article(c)} {c} {d} moving {moves[(d + 1) % 4]} on {article(b)} {b} background"
         for d, (c, b) in zip(range(9, 3, -1), looks[4:] + looks[:2])]


def _demo_moving_digits(args) -> None:
    """Train the moving-digits model on images (first frames) then on clips from it, as video models start from an
    image model (the codec first when none is cached); write a grid of clips; score text-to-video and
    image-to-video on held-out prompts and first frames beside the real clips. --set applies to the video stage."""
    from patchflow.config import load_config
    from patchflow.pipeline import Pipeline, save_grid
    from patchflow.train.trainer import train

    out = Path(args.out or "runs/demo-moving-digits")
    image_run = out / "image"
    t0 = time.perf_counter()
    train(load_config("moving-digits-image"), image_run, resume=args.resume and image_run.is_dir(),
          progress=not args.quiet)
    print(f"image stage trained in {time.perf_counter() - t0:.0f}s ({image_run})")
    cfg = load_config("moving-digits", [f"train.init_from={json.dumps(str(image_run))}", *args.set])
    train(cfg, out, resume=args.resume and (out / "config.toml").is_file(), progress=not args.quiet)
    print(f"trained in {time.perf_counter() - t0:.0f}s")
    pipe = Pipeline.load(out, device="cpu")
    frames = 8
    clips = pipe(prompt=demo_video_prompts(), frames=frames, seed=0)
    save_grid(clips, out / "demo_clips.gif", nrow=4)
    print(f"{cfg.sample.steps} {cfg.sample.sampler} steps, guidance {cfg.sample.guidance}")
    result = _score_video(pipe, 300, frames, seed=1, steps=None, guidance=None, progress=not args.quiet)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"\nclips of demo_video_prompts(): {out / 'demo_clips.gif'}")
    print(f"done in {time.perf_counter() - t0:.0f}s")


def cmd_serve(args) -> None:
    from patchflow.serve import serve

    _check_device(args.device)
    serve(args.runs, host=args.host, port=args.port, device=args.device, max_queue=args.max_queue,
          use_ema=not args.no_ema, token=args.token or os.environ.get("PATCHFLOW_SERVE_TOKEN") or None)


def cmd_report(args) -> None:
    from patchflow.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report written to {path}")


def _add_sampling_flags(p) -> None:
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--sampler", help="euler | heun (flows); ddpm | ddim (diffusion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchflow", description="Train and sample diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a TOML config")
    p.add_argument("config", help="a TOML file or a shipped preset name (e.g. digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=2000")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="sample images or clips from a run")
    p.add_argument("run_dir")
    p.add_argument("--label", type=int, help="class to sample (class-conditional runs)")
    p.add_argument("--n", type=int, default=16, help="samples of --label or --prompt")
    p.add_argument("--labels-all", type=int, metavar="N", help="N samples of every class")
    p.add_argument("--prompt", help="text to sample (text-to-image runs)")
    p.add_argument("--prompts-file", help="one prompt a line, one sample each (blank lines and # lines skipped)")
    p.add_argument("--negative-prompt", help="what to steer away from (replaces the empty prompt of guidance)")
    p.add_argument("--size", metavar="HxW", help="image size in pixels, e.g. 32x48 (default: the training size; "
                                                 "text models sample other sizes and aspect ratios)")
    p.add_argument("--out", required=True, help=".png grid or .npz (images uint8 (N,H,W,C), and labels (N,) or "
                                                "prompts (N,)); video runs: .gif or .mp4 (a clip, or a grid of clips), "
                                                ".npz (videos uint8 (N,T,H,W,3) and prompts (N,)) or .png (frames)")
    p.add_argument("--frames", type=int, help="video runs: frames per clip (default: the training length)")
    p.add_argument("--first-frame", metavar="IMAGE", help="video runs: animate this still (image-to-video)")
    p.add_argument("--extend", metavar="CLIP", help="video runs: continue this clip (.gif, .mp4 or .npz)")
    p.add_argument("--video-to-video", metavar="CLIP", help="video runs: redraw this clip after the prompt (SDEdit)")
    p.add_argument("--strength", type=float, help="with --video-to-video: how much is redrawn, in (0, 1] "
                                                  "(default 0.7)")
    _add_sampling_flags(p)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("eval", help="score a digits or color-digits run (or an .npz of samples), or a codec run's "
                                    "reconstructions")
    p.add_argument("source", help="run directory or .npz written by `patchflow sample`")
    p.add_argument("--per-class", type=int, default=100,
                   help="samples per class when sampling a run (a codec run: 5x this many held-out items)")
    p.add_argument("--prompts", type=int, default=500,
                   help="text runs: held-out canonical prompts to sample (paraphrases and numbers scale with it)")
    p.add_argument("--frames", type=int, help="video runs: frames per scored clip (default 8)")
    p.add_argument("--curve", action="store_true",
                   help="text runs: score every kept checkpoint (the learning curve) on --prompts prompts")
    p.add_argument("--json", help="also write the figures to this JSON file")
    _add_sampling_flags(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("convert", help="import third-party DiT / SD3 weights into a run directory, or export an "
                                       "MMDiT run to diffusers")
    p.add_argument("kind", choices=["dit-official", "diffusers-dit", "diffusers-sd3", "to-diffusers-sd3"],
                   help="dit-official, diffusers-dit, diffusers-sd3: import into a new run directory; "
                        "to-diffusers-sd3: export an MMDiT run (EMA weights) as an SD3Transformer2DModel folder")
    p.add_argument("source", help="official checkpoint (.pt/.pth/.safetensors), a diffusers model or pipeline "
                                  "folder, or (to-diffusers-sd3) a run directory")
    p.add_argument("out_dir")
    p.add_argument("--num-heads", type=int, help="heads, when the hidden size is not one of DiT-S/B/L/XL")
    p.add_argument("--pipeline", metavar="PIPELINE_DIR",
                   help="diffusers-sd3: take the text encoders, VAE and scheduler shift from this "
                        "StableDiffusion3Pipeline folder (for a transformer folder saved on its own, e.g. a fine-tune)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("cache", help="precompute a data set's latents once for a run on a codec")
    p.add_argument("config", help="a TOML file or a shipped preset name (e.g. digits-latent)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="cache folder (default: codec.cache when it is a folder, else $PATCHFLOW_CACHE/latents/...)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("plan", help="parameters, FLOPs, memory per batch size, largest batch that fits")
    p.add_argument("config", help="a TOML file or a shipped preset name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--memory", help="device memory, e.g. 80GB: prints the largest batch that fits")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="batch sizes to tabulate")
    p.add_argument("--checkpoint-every", type=int, default=1, help="activation checkpointing every k-th block")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("demo", help="train a preset on this machine, write a sample grid and score it")
    p.add_argument("world", nargs="?", default="digits", choices=["digits", "color-digits", "moving-digits"],
                   help="digits (class-conditional, a few minutes), color-digits (text-to-image) or moving-digits "
                        "(text-to-video)")
    p.add_argument("--out", help="run directory (default runs/demo, runs/demo-color-digits, "
                                 "runs/demo-moving-digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("serve", help="a local web studio and HTTP API (POST /api/generate) over one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to serve (the page offers a choice)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting at most; more get 503 (try later)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--token",
                   help="the API then needs it: 'Authorization: Bearer TOKEN', or open /?token=TOKEN once in a "
                        "browser (default: $PATCHFLOW_SERVE_TOKEN; none = open)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("report", help="one self-contained HTML page of a run: curves, samples, eval, config")
    p.add_argument("run_dir")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = run(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of torchrun's processes
        # skip interpreter teardown: freeing the model after the process group is gone can abort in gloo's worker
        # threads (SIGABRT); every file is closed and every checkpoint written by now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(args: argparse.Namespace) -> int:
    """The chosen command; returns its exit code."""
    from patchflow.train.errors import TrainingError  # no torch: keeps `--help` fast

    try:
        args.fn(args)
    except (ValueError, OSError, KeyError, ImportError, TrainingError) as e:  # OSError: also a path too long, a
        # folder, no access; ImportError: an optional package (a video writer) that is not installed
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"patchflow {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130
    except SystemExit as e:  # train's SIGTERM stop (exit code 75) has printed its message already
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
