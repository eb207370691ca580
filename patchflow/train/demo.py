"""`patchflow demo [digits | color-digits | moving-digits]`: train a preset on this machine, write a sample grid (or
clips) and score it beside the real data. Training, so it lives in the training package; the CLI calls run_demo."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from patchflow.evaluate.dispatch import score_video


def _demo_train(preset: str, default_out: str, out_arg, overrides, resume: bool, progress: bool):
    """Train a demo preset into --out; returns (config, run directory, its Pipeline, start time)."""
    from patchflow.config import load_config
    from patchflow.pipeline import Pipeline
    from patchflow.train.run import train

    out = Path(out_arg or default_out)
    cfg = load_config(preset, list(overrides))
    t0 = time.perf_counter()
    train(cfg, out, resume=resume, progress=progress)
    print(f"trained in {time.perf_counter() - t0:.0f}s")
    return cfg, out, Pipeline.load(out, device="cpu"), t0


def run_demo(world: str = "digits", out_arg=None, overrides=(), resume: bool = False, progress: bool = True) -> None:
    if world == "color-digits":
        return _demo_color_digits(out_arg, overrides, resume, progress)
    if world == "moving-digits":
        return _demo_moving_digits(out_arg, overrides, resume, progress)
    from patchflow.evaluate.digits import evaluate_samples
    from patchflow.media.grids import save_grid

    cfg, out, pipe, t0 = _demo_train("digits", "runs/demo", out_arg, overrides, resume, progress)
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


def _sampling(s) -> str:
    """How a text demo samples, for its printout: '28 euler steps, guidance 5.0 where t is in [0.5, 1.0]'."""
    lo, hi = s.guidance_interval
    return (f"{s.steps} {s.sampler} steps, guidance {s.guidance}"
            + ("" if (lo, hi) == (0, 1) else f" where t is in [{lo}, {hi}]"))


def _demo_color_digits(out_arg, overrides, resume: bool, progress: bool) -> None:
    """Train the color-digits text-to-image preset (its codec first when none is cached), write a sample grid, and
    score prompt following on held-out prompts beside the real images."""
    from patchflow.evaluate.text_run import evaluate_pipeline
    from patchflow.media.grids import save_grid

    cfg, out, pipe, t0 = _demo_train("color-digits", "runs/demo-color-digits", out_arg, overrides, resume, progress)
    save_grid(pipe(prompt=demo_prompts(), seed=0), out / "demo_grid.png", nrow=10)
    result = evaluate_pipeline(pipe, seed=1, progress=progress)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"sample grid: {out / 'demo_grid.png'} (rows: prompts in demo_prompts(), digits 0-9 across)")
    for kind, r in result.items():
        print(f"\n{kind} held-out prompts, {_sampling(cfg.sample)}; model vs real images:\n{r['table']}")
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


def _demo_moving_digits(out_arg, overrides, resume: bool, progress: bool) -> None:
    """Train the moving-digits model on images (first frames) then on clips from it, as video models start from an
    image model (the codec first when none is cached); write a grid of clips; score text-to-video and
    image-to-video on held-out prompts and first frames beside the real clips. --set applies to the video stage."""
    from patchflow.config import load_config
    from patchflow.media.grids import save_grid
    from patchflow.pipeline import Pipeline
    from patchflow.train.run import train

    out = Path(out_arg or "runs/demo-moving-digits")
    image_run = out / "image"
    t0 = time.perf_counter()
    train(load_config("moving-digits-image"), image_run, resume=resume and image_run.is_dir(),
          progress=progress)
    print(f"image stage trained in {time.perf_counter() - t0:.0f}s ({image_run})")
    cfg = load_config("moving-digits", [f"train.init_from={json.dumps(str(image_run))}", *list(overrides)])
    train(cfg, out, resume=resume and (out / "config.toml").is_file(), progress=progress)
    print(f"trained in {time.perf_counter() - t0:.0f}s")
    pipe = Pipeline.load(out, device="cpu")
    frames = 8
    clips = pipe(prompt=demo_video_prompts(), frames=frames, seed=0)
    save_grid(clips, out / "demo_clips.gif", nrow=4)
    print(_sampling(cfg.sample))
    result = score_video(pipe, 300, frames, seed=1, steps=None, guidance=None, progress=progress)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"\nclips of demo_video_prompts(): {out / 'demo_clips.gif'}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
