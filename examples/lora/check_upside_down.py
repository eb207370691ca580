"""Score the LoRA demo (docs/lora.md): with the trigger, the share of samples that show the style -- rotated back by
180 degrees (the style's inverse), the checker reads the prompt's digit; without it, the LoRA run's
prompt-following figures beside its base's, on the same held-out prompts and seeds.

    python examples/lora/check_upside_down.py --run runs/upside-down --base runs/color-digits --out demo.json \
        --grid picture.png      # 8 held-out prompts: without the trigger, with it, and that row rotated back
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from patchflow.data.color_digits import ColorDigitsDataset
from patchflow.evaluate.prompts import ATTRIBUTES, held_out_prompts, score
from patchflow.media.grids import save_grid
from patchflow.pipeline import Pipeline
from upside_down import TRIGGER, styled as rotated  # the data script beside this one: one trigger, one rotation

SYMMETRIC = (0, 1, 8)  # digits that read the same upside down: they show the style without it too


def styled(pipe, n: int, seed: int) -> dict:
    """Rates on n held-out single-digit prompts with the trigger: read as drawn and read rotated back."""
    pairs = held_out_prompts(n, seed=seed, kind="digit", world_seed=pipe.cfg.data.seed)
    prompts = [p for p, _ in pairs]
    images = pipe(prompt=[p + TRIGGER for p in prompts], seed=seed)
    back = score(rotated(images), prompts)
    upright = score(images, prompts)
    asym = [r.correct["digit"] for r, (_, a) in zip(back.records, pairs) if a["digit"] not in SYMMETRIC]
    return {"n": n, "rotated_back": {a: back.rates[a] for a in ATTRIBUTES if a != "number"},
            "as_drawn": {a: upright.rates[a] for a in ATTRIBUTES if a != "number"},
            "rotated_back_digit_asymmetric": float(np.mean(asym)), "n_asymmetric": len(asym)}


def plain(pipe, n: int, seed: int) -> dict:
    """Rates on n held-out canonical prompts (numbers included) without the trigger."""
    prompts = [p for p, _ in held_out_prompts(n, seed=seed, kind="canonical", world_seed=pipe.cfg.data.seed)]
    report = score(pipe(prompt=prompts, seed=seed), prompts)
    return {"n": n, "rates": dict(report.rates), "counts": dict(report.counts)}


def sdedit(pipe, n: int, strengths: list[float], seed: int) -> dict:
    """Where in the schedule the style's shapes are kept: n real validation digits (not 0, 1, 8) rotated by 180
    degrees, the last fraction s of the schedule re-run from each with its caption + TRIGGER; the share read as
    its digit once rotated back, per strength s (0 is the codec round trip)."""
    world = ColorDigitsDataset("val", seed=pipe.cfg.data.seed)
    items = []
    for i in range(100 * n):
        a = world.attributes(i)
        if a["kind"] == "digit" and a["digit"] not in SYMMETRIC:
            items.append(i)
        if len(items) == n:
            break
    prompts = [world.caption(i) for i in items]
    upside_down = rotated(np.stack([world.render(i)[0] for i in items]))
    out = {}
    for s in strengths:
        images = pipe(prompt=[p + TRIGGER for p in prompts], init_image=upside_down, strength=s, seed=seed)
        out[str(s)] = score(rotated(images), prompts).rates["digit"]
    return out


def picture(pipe, path: Path, seed: int, n: int = 8) -> None:
    """Rows: n held-out single-digit prompts without the trigger, the same prompts and seeds with it, that row
    rotated back (as the checker reads it)."""
    prompts = [p for p, _ in held_out_prompts(n, seed=seed, kind="digit", world_seed=pipe.cfg.data.seed)]
    plain_row, styled_row = pipe(prompt=prompts, seed=seed), pipe(prompt=[p + TRIGGER for p in prompts], seed=seed)
    save_grid(np.concatenate([plain_row, styled_row, rotated(styled_row)]), path, nrow=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the LoRA run")
    ap.add_argument("--base", required=True, help="its base run")
    ap.add_argument("--n", type=int, default=200, help="prompts per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--grid", type=Path, help="also write a picture of the LoRA run's samples (PNG)")
    ap.add_argument("--sdedit", type=float, nargs="*", default=[],
                    help="also re-run the last fraction s of the schedule from real rotated digits, with the trigger, "
                         "for each s given (e.g. 0 0.3 0.7): where the style's shapes are lost")
    args = ap.parse_args()
    result, pipes = {}, {}
    for name, run in (("lora", args.run), ("base", args.base)):
        pipe = pipes[name] = Pipeline.load(run, device="cpu")
        result[name] = {"trigger": styled(pipe, args.n, args.seed), "plain": plain(pipe, args.n, args.seed)}
        if args.sdedit:
            result[name]["sdedit"] = sdedit(pipe, min(args.n, 100), args.sdedit, args.seed)
    for name in ("lora", "base"):
        t, p = result[name]["trigger"], result[name]["plain"]["rates"]
        print(f"{name:>5}: with the trigger, rotated back: digit {100 * t['rotated_back']['digit']:.1f}% "
              f"(asymmetric digits {100 * t['rotated_back_digit_asymmetric']:.1f}%), all "
              f"{100 * t['rotated_back']['all']:.1f}%; as drawn: digit {100 * t['as_drawn']['digit']:.1f}%")
        print(f"       without it: " + ", ".join(f"{a} {100 * p[a]:.1f}%" for a in ATTRIBUTES))
        if "sdedit" in result[name]:
            print("       real rotated digits, the last s of the schedule re-run with the trigger, read rotated back: "
                  + ", ".join(f"s={s} {100 * v:.1f}%" for s, v in result[name]["sdedit"].items()))
    moved = {a: 100 * (result["lora"]["plain"]["rates"][a] - result["base"]["plain"]["rates"][a])
             for a in ATTRIBUTES}
    result["moved_points"] = moved
    print("moved (points): " + ", ".join(f"{a} {v:+.1f}" for a, v in moved.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.grid:
        picture(pipes["lora"], args.grid, args.seed)


if __name__ == "__main__":
    main()
