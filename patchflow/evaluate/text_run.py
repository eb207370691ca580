"""Prompt following of a text-to-image run on the `color-digits` world: sample held-out prompts, score them with
the independent checker (`evaluate.prompts`), put the real held-out images' figures beside them; and the learning
curve of a run (the same score at each kept checkpoint, against training minutes).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from patchflow.evaluate.prompts import ATTRIBUTES, format_report, held_out_prompts, real_reference, score

# prompt sets scored by default: held-out canonical captions (25% of them numbers), paraphrases, numbers only
PROMPT_SETS = {"canonical": 500, "paraphrase": 300, "number": 200}


def evaluate_pipeline(pipe, sets: dict[str, int] | None = None, seed: int = 0, steps: int | None = None,
                      guidance: float | None = None, progress: bool = False, sampler: str | None = None) -> dict:
    """{kind: {"model": figures, "real": figures, "table": text}} for each prompt set {kind: n}; the samples of a
    set use `seed`, the prompts are the validation items `held_out_prompts(n, seed, kind)`."""
    out = {}
    for kind, n in (sets or PROMPT_SETS).items():
        prompts = [p for p, _ in held_out_prompts(n, seed=seed, kind=kind, world_seed=pipe.cfg.data.seed)]
        images = pipe(prompt=prompts, steps=steps, guidance=guidance, seed=seed, sampler=sampler, progress=progress)
        report = score(images, prompts)
        reference = real_reference(n, seed=seed, kind=kind, world_seed=pipe.cfg.data.seed)
        out[kind] = {"model": report.as_dict(), "real": reference.as_dict(), "table": format_report(report, reference)}
    return out


def training_minutes(run_dir: str | Path) -> dict[int, float]:
    """step -> training minutes up to it, from log.jsonl's throughput (sampling and checkpoint time left out)."""
    from patchflow.pipeline import load_run_config

    cfg = load_run_config(run_dir)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    minutes, total, previous = {}, 0.0, 0
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("steps_per_s"):
            total += (r["step"] - previous) / r["steps_per_s"] / 60
        elif r.get("images_per_s"):
            total += (r["step"] - previous) * per_step / r["images_per_s"] / 60
        previous = r["step"]
        minutes[r["step"]] = total
    return minutes


def checkpoint_curve(run_dir: str | Path, score_fn) -> list[dict]:
    """[{step, minutes, rates}] of every kept checkpoint's EMA weights, by step; score_fn(pipe) -> rates."""
    from patchflow.lora.run import lora_base, weights_on
    from patchflow.models import build_model
    from patchflow.pipeline import Pipeline
    from patchflow.run_dir import list_checkpoints, load_into, step_of

    pipe = Pipeline.load(run_dir, device="cpu")
    minutes = training_minutes(run_dir)
    cfg, curve = pipe.cfg, []
    # a LoRA run's checkpoints hold adapters: merged into its base, read once
    base = lora_base(Path(run_dir), cfg, build_model(cfg.model))[0] if cfg.lora.enabled else None
    for ckpt in list_checkpoints(Path(run_dir)):
        path = ckpt / "ema.safetensors"
        load_into(pipe.model, weights_on(base, cfg, path), source=str(path))
        step = step_of(ckpt)
        curve.append({"step": step, "minutes": round(minutes.get(step, float("nan")), 2), "rates": score_fn(pipe)})
    return curve


def learning_curve(run_dir: str | Path, n: int = 300, seed: int = 0, kind: str = "canonical",
                   steps: int | None = None, guidance: float | None = None, sampler: str | None = None) -> list[dict]:
    """The score of every kept checkpoint's EMA weights on n held-out prompts: [{step, minutes, rates}], by step."""
    from patchflow.pipeline import load_run_config

    world_seed = load_run_config(run_dir).data.seed
    prompts = [p for p, _ in held_out_prompts(n, seed=seed, kind=kind, world_seed=world_seed)]

    def rates(pipe) -> dict:
        report = score(pipe(prompt=prompts, steps=steps, guidance=guidance, seed=seed, sampler=sampler), prompts)
        return {a: report.rates[a] for a in ATTRIBUTES}

    return checkpoint_curve(run_dir, rates)


def format_curve(curve: list[dict], attributes=ATTRIBUTES) -> str:
    width = max(11, *(len(a) + 2 for a in attributes))
    head = f"{'step':>6}{'minutes':>9}" + "".join(f"{a:>{width}}" for a in attributes)
    rows = [head, "-" * len(head)]
    for c in curve:
        rates = "".join("-".rjust(width) if np.isnan(c["rates"][a]) else f"{100 * c['rates'][a]:{width - 1}.1f}%"
                        for a in attributes)
        rows.append(f"{c['step']:>6}{c['minutes']:>9.1f}{rates}")
    return "\n".join(rows)
