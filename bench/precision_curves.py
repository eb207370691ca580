"""Does bf16 autocast train like fp32? Loss curves of the real trainer in both precisions, against run-to-run noise.

For every seed the same run is trained twice, `train.precision = "fp32"` and `"bf16"`; with one seed both see
the same initial weights, batches, timesteps and noise, so their gap is the precision's alone. Run-to-run noise
is the gap between two seeds in the same precision. Each curve is the per-step training loss (`log.jsonl`,
logged every step), smoothed by a moving average. Printed: the mean absolute gap between smoothed curves
(after the first `--skip` steps), the mean loss of the last `--tail` steps of each run, and the training
images/s of each precision. Written to --out: every run's directory, `curves.json` and `curves.png`
(matplotlib, if installed).

    python bench/precision_curves.py                                    # the digits demo model, 300 steps
    python bench/precision_curves.py --steps 200 --set 'model.preset="DiT-S/2"' --set train.batch_size=16
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from patchflow.config import load_config
from patchflow.train.run import train

PRECISIONS = ("fp32", "bf16")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def mean_gap(a: list[float], b: list[float], skip: int) -> float:
    return statistics.fmean(abs(x - y) for x, y in list(zip(a, b))[skip:])


def read_log(run: Path) -> tuple[list[float], float]:
    """Per-step losses and the median images/s of a run's log.jsonl."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows], statistics.median(r["images_per_s"] for r in rows[1:] or rows)


def run_all(args) -> dict:
    runs = {}
    for seed in args.seeds:
        for precision in PRECISIONS:
            name = f"{precision}-seed{seed}"
            overrides = [*args.set, f'train.precision="{precision}"', f"train.seed={seed}",
                         f"train.steps={args.steps}", "train.log_every=1", "train.sample_every=0",
                         f"train.checkpoint_every={args.steps}"]
            if args.threads:
                overrides.append(f"train.num_threads={args.threads}")
            cfg = load_config(args.config, overrides)
            out = Path(args.out) / name
            if not (out / "log.jsonl").exists() or args.fresh:
                print(f"training {name} ...", flush=True)
                train(cfg, out, progress=False)
            losses, rate = read_log(out)
            runs[name] = {"seed": seed, "precision": precision, "loss": losses, "images_per_s": rate,
                          "smoothed": smooth(losses, args.window)}
    return runs


def summarize(runs: dict, args) -> dict:
    s = {name: r["smoothed"] for name, r in runs.items()}
    precision_gaps = {f"seed{seed}": mean_gap(s[f"fp32-seed{seed}"], s[f"bf16-seed{seed}"], args.skip)
                      for seed in args.seeds}
    seed_gaps = {}
    for p in PRECISIONS:
        for a, b in zip(args.seeds, args.seeds[1:]):
            seed_gaps[f"{p} seed{a} vs seed{b}"] = mean_gap(s[f"{p}-seed{a}"], s[f"{p}-seed{b}"], args.skip)
    tails = {name: statistics.fmean(r["loss"][-args.tail:]) for name, r in runs.items()}
    rates = {p: statistics.fmean(r["images_per_s"] for r in runs.values() if r["precision"] == p) for p in PRECISIONS}
    return {"precision_gap": precision_gaps, "seed_gap": seed_gaps, "final_loss": tails, "images_per_s": rates}


def plot(runs: dict, summary: dict, path: Path, args) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, gap) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2))
    styles = {"fp32": "-", "bf16": "--"}
    for name, r in runs.items():
        ax.plot(range(1, len(r["smoothed"]) + 1), r["smoothed"], styles[r["precision"]], label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_ylabel(f"training loss (moving average of {args.window})")
    ax.set_title(f"{args.config}: fp32 vs bf16 autocast ({', '.join(args.set) or 'preset as shipped'})", fontsize=9)
    ax.legend()
    s = {name: r["smoothed"] for name, r in runs.items()}
    first, second = args.seeds[0], args.seeds[1]
    pairs = [(f"bf16 - fp32, seed {seed}", s[f"bf16-seed{seed}"], s[f"fp32-seed{seed}"], "-") for seed in args.seeds]
    pairs += [(f"{p} seed {second} - seed {first} (run-to-run)", s[f"{p}-seed{second}"], s[f"{p}-seed{first}"], ":")
              for p in PRECISIONS]
    for label, a, b, style in pairs:
        gap.plot(range(args.skip + 1, len(a) + 1), [x - y for x, y in zip(a[args.skip:], b[args.skip:])], style,
                 label=label, linewidth=1.2)
    gap.axhline(0, color="grey", linewidth=0.5)
    gap.set_xlabel("step")
    gap.set_ylabel("difference of smoothed losses")
    gap.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="digits", help="TOML file or shipped preset (default: digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as in the CLI")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="at least two, for the run-to-run noise")
    p.add_argument("--window", type=int, default=25, help="moving-average window (steps)")
    p.add_argument("--skip", type=int, default=25, help="steps left out of the gaps (the steep start)")
    p.add_argument("--tail", type=int, default=50, help="steps averaged for the final loss")
    p.add_argument("--threads", type=int, default=0, help="train.num_threads (0: torch's default)")
    p.add_argument("--out", default="runs/precision-curves")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already have a log")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds needs at least two seeds: run-to-run noise is the gap between seeds")
    if args.steps <= args.skip:
        p.error(f"--steps ({args.steps}) must be larger than --skip ({args.skip})")
    runs = run_all(args)
    summary = summarize(runs, args)
    out = Path(args.out)
    (out / "curves.json").write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1))
    print(f"\nmean |gap| between smoothed curves (window {args.window}, after step {args.skip}):")
    for k, v in summary["precision_gap"].items():
        print(f"  fp32 vs bf16, {k:22s} {v:.5f}")
    for k, v in summary["seed_gap"].items():
        print(f"  run-to-run, {k:24s} {v:.5f}")
    print(f"mean loss of the last {args.tail} steps:")
    for k, v in summary["final_loss"].items():
        print(f"  {k:14s} {v:.5f}")
    print("training images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["images_per_s"].items())
          + f" (bf16 / fp32 = {summary['images_per_s']['bf16'] / summary['images_per_s']['fp32']:.2f}x)")
    if plot(runs, summary, out / "curves.png", args):
        print(f"wrote {out / 'curves.png'}")
    print(f"wrote {out / 'curves.json'}")


if __name__ == "__main__":
    main()
