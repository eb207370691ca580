"""`patchflow eval SOURCE`: which scorer a source needs, by what it is (an .npz of samples, or a run of some kind
on some world), and the figures it prints. The CLI parses the flags into `EvalOptions` and writes the JSON."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchflow.config import MAX_SAMPLES, WORLDS
from patchflow.sample_request import CLI, check_request


@dataclass
class EvalOptions:
    per_class: int = 100           # class runs: samples per class (codec runs: 5x this many held-out items)
    prompts: int = 500             # text and video runs: held-out prompts
    frames: int | None = None      # video runs: frames per scored clip (default video_run.FRAMES)
    curve: bool = False            # score every kept checkpoint (the learning curve)
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    device: str = "auto"
    ema: bool = True
    progress: bool = True


def evaluate_source(src: str | Path, opts: EvalOptions) -> dict | list:
    """Score an .npz written by `patchflow sample`, or a run directory; prints the figures, returns them."""
    src = Path(src)
    if src.suffix == ".npz":
        return _evaluate_npz(src)
    from patchflow.run_dir import load_run_config

    cfg = load_run_config(src)
    if cfg.kind.codec:
        return _evaluate_codec(src, cfg, opts)
    if cfg.kind.video:
        return _evaluate_video(src, cfg, opts)
    if cfg.kind.prompts:
        return _evaluate_text(src, cfg, opts)
    return _evaluate_class(src, cfg, opts)


def _evaluate_npz(src: Path) -> dict:
    """Clips (videos, prompts), text samples (images, prompts) or class samples (images, labels)."""
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
        if "videos" in f.files or "prompts" in f.files:  # prompt following per clip, or per image
            from patchflow.evaluate import clips, prompts

            scorer = clips if "videos" in f.files else prompts
            report = scorer.score_npz(src)
            print(scorer.format_report(report))
            return report.as_dict()
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{src} lacks {sorted(missing)}; patchflow sample --out x.npz writes images and "
                             f"labels (class runs) or images and prompts (text runs)")
        images, labels = f["images"], f["labels"]
    return _print_class_scores(images, labels)


def _print_class_scores(images, labels) -> dict:
    from patchflow.evaluate.digits import evaluate_samples

    result = evaluate_samples(images, labels)
    print(f"samples: {result['n']}")
    print(f"class accuracy: {result['accuracy']:.4f}   (classifier on real validation digits: "
          f"{result['classifier_val_accuracy']:.4f})")
    print(f"Frechet distance (classifier features): {result['fd']:.3f}   (real-data ceiling: {result['fd_real']:.3f})")
    return result


def _evaluate_class(src: Path, cfg, opts: EvalOptions) -> dict:
    """A digits run: opts.per_class samples of every class through the digit classifier."""
    from patchflow.pipeline import Pipeline

    if cfg.data.dataset != "digits":
        raise ValueError(f"patchflow eval scores runs of the built-in digits world; {src} trains on {cfg.data.dataset}")
    n = cfg.model.num_classes
    check_request(cfg, CLI, str(src), labels=[], sampler=opts.sampler)
    if opts.per_class * n > MAX_SAMPLES:
        raise ValueError(f"--per-class {opts.per_class} asks for {opts.per_class * n} samples ({n} classes); at most "
                         f"{MAX_SAMPLES}")
    labels = np.repeat(np.arange(n), opts.per_class)
    if opts.curve:
        return _class_curve(src, labels, opts)
    pipe = Pipeline.load(src, ema=opts.ema, device=opts.device)
    images = pipe(labels.tolist(), steps=opts.steps, guidance=opts.guidance, seed=opts.seed, sampler=opts.sampler,
                  progress=opts.progress)
    return _print_class_scores(images, labels)


def _world_run(src: Path, cfg, opts: EvalOptions, *, world: str, what: str, limit: int, curve, score):
    """What text and video runs share: the run must train on `world`, --prompts be in 1..limit; then the learning
    curve (curve(n) -> (rows, printed table)) or score(pipe, n) -> the figures, printed by score, JSON-able."""
    from patchflow.pipeline import Pipeline

    if cfg.data.dataset != world:
        raise ValueError(f"patchflow eval scores {what} of the built-in {world} world; {src} trains on "
                         f"{cfg.data.dataset} (sample it with --prompts-file --out samples.npz and score that)")
    check_request(cfg, CLI, str(src), prompts=[], sampler=opts.sampler)
    n = opts.prompts
    if not 1 <= n <= limit:
        raise ValueError(f"--prompts must be in 1..{limit} (the held-out items), got {n}")
    if not opts.curve:
        return score(Pipeline.load(src, ema=opts.ema, device=opts.device), n)
    rows, table = curve(n)
    if not rows:
        raise ValueError(f"{src}/checkpoints holds no checkpoint to score")
    print(table)
    return rows


def _evaluate_video(src: Path, cfg, opts: EvalOptions):
    """A moving-digits video run: text-to-video on held-out prompts beside the real held-out clips, and
    image-to-video from real held-out first frames; with curve the learning curve over kept checkpoints."""
    from patchflow.evaluate import video_run
    from patchflow.evaluate.clips import RATES
    from patchflow.evaluate.text_run import format_curve

    frames = opts.frames or video_run.FRAMES

    def curve(n):
        rows = video_run.learning_curve(src, n=n, seed=opts.seed, frames=frames, steps=opts.steps,
                                        guidance=opts.guidance, sampler=opts.sampler)
        return rows, format_curve(rows, RATES)

    return _world_run(src, cfg, opts, world="moving-digits", what="video runs", limit=500, curve=curve,
                      score=lambda pipe, n: score_video(pipe, n, frames, opts.seed, opts.steps, opts.guidance,
                                                        opts.progress, opts.sampler))


def score_video(pipe, n: int, frames: int, seed: int, steps, guidance, progress: bool, sampler=None) -> dict:
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


def _evaluate_text(src: Path, cfg, opts: EvalOptions):
    """A color-digits text run: prompt following on held-out prompts (canonical, paraphrased, numbers) beside the
    real held-out images, or with curve the learning curve over the run's kept checkpoints."""
    from patchflow.evaluate.text_run import evaluate_pipeline, format_curve, learning_curve

    def curve(n):
        rows = learning_curve(src, n=n, seed=opts.seed, steps=opts.steps, guidance=opts.guidance,
                              sampler=opts.sampler)
        return rows, format_curve(rows)

    def score(pipe, n):
        sets = {"canonical": n, "paraphrase": max(1, n * 3 // 5), "number": min(239, max(1, n * 2 // 5))}
        result = evaluate_pipeline(pipe, sets, seed=opts.seed, steps=opts.steps, guidance=opts.guidance,
                                   progress=opts.progress, sampler=opts.sampler)
        for kind, r in result.items():
            print(f"\n{kind} prompts ({r['model']['n']}), model vs real held-out images:\n{r['table']}")
        return result

    return _world_run(src, cfg, opts, world="color-digits", what="prompt following", limit=1000, curve=curve,
                      score=score)


def _evaluate_codec(src: Path, cfg, opts: EvalOptions) -> dict:
    """A codec run: reconstruction PSNR, compression, digit accuracy before/after, colours (evaluate.codec)."""
    from patchflow import codecs
    from patchflow.evaluate.codec import evaluate_codec

    if cfg.data.dataset not in WORLDS:
        raise ValueError(f"patchflow eval scores codecs of the built-in worlds ({', '.join(WORLDS)}); {src} trains "
                         f"on {cfg.data.dataset}")
    r = evaluate_codec(codecs.load(src), cfg.data.dataset, n=opts.per_class * 5, frames=cfg.data.frames)
    print(f"{r['world']}: {r['n']} held-out items" + (f" of {r['frames']} frames" if r.get("frames", 1) > 1 else ""))
    print(f"reconstruction PSNR {r['psnr_db']:.2f} dB, compression {r['compression']:.1f}x (pixel values per "
          f"latent value)")
    print(f"digit accuracy: originals {r['accuracy_original']:.4f}, reconstructions {r['accuracy_reconstructed']:.4f}")
    if "stroke_rgb_error" in r:
        print(f"colours: mean RGB error {r['stroke_rgb_error']:.1f} on strokes, {r['background_rgb_error']:.1f} on "
              f"backgrounds; named colour kept {r['stroke_color_kept']:.4f} (digit), "
              f"{r['background_color_kept']:.4f} (background)")
    return r


def _class_curve(src: Path, labels, opts: EvalOptions) -> list:
    """A digits run's learning curve: class accuracy and Frechet distance of every kept checkpoint's EMA weights."""
    from patchflow.evaluate.digits import evaluate_samples
    from patchflow.evaluate.text_run import checkpoint_curve

    def rates(pipe) -> dict:
        images = pipe(labels.tolist(), steps=opts.steps, guidance=opts.guidance, seed=opts.seed, sampler=opts.sampler,
                      progress=False)
        result = evaluate_samples(images, labels)
        return {"accuracy": result["accuracy"], "fd": result["fd"]}

    rows = checkpoint_curve(src, rates)
    print(f"{'step':>6}{'minutes':>9}{'accuracy':>10}{'FD':>9}")
    for r in rows:
        print(f"{r['step']:>6}{r['minutes']:>9.1f}{100 * r['rates']['accuracy']:>9.1f}%{r['rates']['fd']:>9.1f}")
    return rows
