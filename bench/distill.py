"""A teacher and its few-step students side by side, in one process on one machine: the scores `patchflow eval`
gives each (its own sample settings: the teacher's steps and guidance, a student's steps at guidance 1), the
sampling time per image (or clip), and the training time of each run from its log.

    python bench/distill.py runs/demo runs/demo-4step runs/demo-1step --per-class 50 --out distill.json

Sampling time: --batch samples of one batch, after one warm-up batch, the best of --repeat, on the CPU unless
--device says otherwise. Training time: the sum over log.jsonl's windows of steps / steps_per_s (sampling previews
and checkpoints left out), the teacher's with the runs it started from (train.init_from, e.g. the image stage of
`patchflow demo moving-digits`), so the ratio student / teacher is the distillation's share of the teacher's training.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from patchflow.evaluate.dispatch import EvalOptions, evaluate_source
from patchflow.pipeline import Pipeline
from patchflow.previews import preview_prompts
from patchflow.run_dir import load_run_config


def training_seconds(run: Path) -> float:
    """Seconds of training steps in a run's log.jsonl (each record covers the steps since the one before)."""
    total, last = 0.0, 0
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("steps_per_s"):
            total += (r["step"] - last) / r["steps_per_s"]
        last = r["step"]
    return total


def teacher_seconds(run: Path) -> float:
    """A teacher's training seconds, with the runs it started from (train.init_from: the image stage of a
    two-stage `patchflow demo moving-digits`), since the student stands in for all of that training."""
    total, seen = 0.0, set()
    while run is not None and (run / "log.jsonl").is_file() and run.resolve() not in seen:
        seen.add(run.resolve())
        total += training_seconds(run)
        cfg = load_run_config(run)
        run = Path(cfg.train.init_from) if cfg.train.init_from and not cfg.lora.enabled else None
    return total


def sample_seconds(run: Path, batch: int, repeat: int, device: str) -> float:
    """Best time of one batch of `batch` samples at the run's own settings, per sample."""
    pipe = Pipeline.load(run, device=device)
    cfg = pipe.cfg
    kw = {"prompt": preview_prompts(cfg, batch)} if cfg.kind.prompts else {"labels": [i % 10 for i in range(batch)]}
    pipe(**kw, seed=0)  # warm-up
    best = float("inf")
    for i in range(repeat):
        t0 = time.perf_counter()
        pipe(**kw, seed=1 + i)
        best = min(best, time.perf_counter() - t0)
    return best / batch


def headline(result) -> dict:
    """The figures of an eval result that the table shows."""
    if not result:
        return {}
    if "accuracy" in result:  # a class run
        return {"accuracy": round(result["accuracy"], 4), "fd": round(result["fd"], 2)}
    if "model" in result:  # a clip run's report
        return {k: round(v, 4) for k, v in result["model"]["rates"].items()}
    return {kind: {k: round(v, 4) for k, v in r["model"]["rates"].items()} for kind, r in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="the teacher first, then its students")
    ap.add_argument("--per-class", type=int, default=50, help="class runs: samples per class")
    ap.add_argument("--prompts", type=int, default=200, help="text and video runs: held-out prompts")
    ap.add_argument("--batch", type=int, default=50, help="samples per timed batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-scores", action="store_true", help="time only (the scores: `patchflow eval RUN`)")
    ap.add_argument("--out", type=Path, help="a JSON file of the figures")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        cfg = load_run_config(run)
        result = {}
        if not args.no_scores:
            with contextlib.redirect_stdout(io.StringIO()):  # eval's own table; the figures come back as a dict
                result = evaluate_source(run, EvalOptions(per_class=args.per_class, prompts=args.prompts,
                                                          seed=args.seed, device=args.device, progress=False))
        row = {"run": str(run), "steps": cfg.sample.steps, "guidance": cfg.sample.guidance,
               "method": cfg.distill.method if cfg.distill.enabled else "teacher",
               "train_s": training_seconds(run) if rows else teacher_seconds(run),  # rows[0]: the teacher
               "sample_s": sample_seconds(run, args.batch, args.repeat, args.device),
               "scores": result}
        rows.append(row)
        print(f"{run}: {row['method']}, {row['steps']} steps, guidance {row['guidance']}: "
              f"{json.dumps(headline(result))}; {1000 * row['sample_s']:.1f} ms per sample; trained "
              f"{row['train_s']:.0f} s ({100 * row['train_s'] / rows[0]['train_s']:.0f}% of the first run's)",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
