"""Prompt following of a text-to-video run on the `moving-digits` world: clips of held-out prompts scored by the
clip checker (`evaluate.clips`) beside the real held-out clips; image-to-video from real held-out first frames
(frame 0 kept, digit, colours and motion as asked); and the learning curve over the run's kept checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from patchflow.evaluate.clips import RATES, format_report, held_out_prompts, real_reference, score_clips, \
    score_first_frame
from patchflow.evaluate.text_run import checkpoint_curve

FRAMES = 8  # the clip length scored by default


def _held_out(pipe, n: int, seed: int, frames: int):
    from patchflow.data.moving_digits import MovingDigitsDataset

    pairs = held_out_prompts(n, seed=seed, frames=frames, world_seed=pipe.cfg.data.seed)
    data = MovingDigitsDataset("val", seed=pipe.cfg.data.seed, frames=frames)
    return [p for p, _ in pairs], [a["item"] for _, a in pairs], data


def text_to_video(pipe, n: int = 300, seed: int = 0, frames: int = FRAMES, steps: int | None = None,
                  guidance: float | None = None, progress: bool = False, sampler: str | None = None) -> dict:
    """{"model", "real", "table", "clips", "prompts"} for n held-out canonical prompts."""
    prompts, _, _ = _held_out(pipe, n, seed, frames)
    clips = pipe(prompt=prompts, frames=frames, steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                 progress=progress)
    report = score_clips(clips, prompts)
    real = real_reference(n, frames=frames, seed=seed, world_seed=pipe.cfg.data.seed)
    return {"model": report.as_dict(), "real": real.as_dict(), "table": format_report(report, real),
            "clips": clips, "prompts": prompts}


def image_to_video(pipe, n: int = 200, seed: int = 1, frames: int = FRAMES, steps: int | None = None,
                   guidance: float | None = None, progress: bool = False, sampler: str | None = None) -> dict:
    """Real held-out clips' first frames animated from their captions: {"model", "first_frame_mae" (0-255 levels),
    "table", "clips", "prompts"}."""
    prompts, items, data = _held_out(pipe, n, seed, frames)
    firsts = np.stack([data.render(i)[0][0] for i in items])
    clips = pipe(prompt=prompts, frames=frames, first_frame=firsts, steps=steps, guidance=guidance, seed=seed,
                 sampler=sampler, progress=progress)
    report = score_clips(clips, prompts)
    mae = score_first_frame(clips, firsts)
    return {"model": report.as_dict(), "first_frame_mae": mae.mean, "table": format_report(report),
            "clips": clips, "prompts": prompts}


def learning_curve(run_dir: str | Path, n: int = 200, seed: int = 0, frames: int = FRAMES,
                   steps: int | None = None, guidance: float | None = None, sampler: str | None = None) -> list[dict]:
    """[{step, minutes, rates}] of every kept checkpoint on n held-out text-to-video prompts."""
    def rates(pipe) -> dict:
        prompts, _, _ = _held_out(pipe, n, seed, frames)
        clips = pipe(prompt=prompts, frames=frames, steps=steps, guidance=guidance, seed=seed, sampler=sampler)
        report = score_clips(clips, prompts)
        return {a: report.rates[a] for a in RATES}

    return checkpoint_curve(run_dir, rates)
