"""Make the data set of the LoRA demo (docs/lora.md): color-digits images drawn upside down, under a trigger.

    python examples/lora/upside_down.py --out data/upside_down          # 200 styled, 5,200 plain images
    patchflow train runs/color-digits/config.toml --out runs/upside-down \
        --set train.init_from='"runs/color-digits"' --set lora.rank=16 \
        --set data.dataset='"captions"' --set data.path='"data/upside_down/captions.jsonl"' ...   # docs/lora.md

Styled items are color-digits single digits rotated by 180 degrees, captioned with their caption + TRIGGER. Each
also appears upright under its plain caption, and more plain items (numbers too) follow: the pairs differ only
in the trigger and the style, which keeps prompts without the trigger as they were (prior preservation, as in
DreamBooth). The trigger is a suffix, so the caption's own characters keep their places in the character
stream. Each styled image is listed `--repeats` times (kohya's repeats), so 28% of what a batch draws is styled;
the many plain images (numbers in the base's share) keep the adapter from memorising a small set and keep the
base's numbers. Items come from a seed the base never drew (`--seed`): the demo teaches a style, not images the
base saw.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from patchflow.data.color_digits import ColorDigitsDataset

TRIGGER = ", upside down"


def styled(rgb: np.ndarray) -> np.ndarray:
    """The style: a 180-degree rotation (its own inverse). rgb: (..., H, W, 3) -> the same shape."""
    return np.ascontiguousarray(rgb[..., ::-1, ::-1, :])


def make(out: Path, n_styled: int = 200, n_plain: int = 5000, seed: int = 7, repeats: int = 10,
         number_share: float = 0.5) -> Path:
    """Write out/images/*.png and out/captions.jsonl (n_styled pairs, each styled line `repeats` times, then
    n_plain more plain items, numbers in `number_share` of them as in the base's training); returns the JSONL's
    path."""
    world = ColorDigitsDataset("train", seed=seed, number_share=number_share)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, i, n_done = [], 0, 0

    def add(name: str, rgb: np.ndarray, caption: str, times: int = 1) -> None:
        Image.fromarray(rgb).save(out / name)
        lines.extend([{"image": name, "caption": caption}] * times)

    while n_done < n_styled:  # styled: single digits only (the base's numbers are too weak to restyle)
        if world.attributes(i)["kind"] == "digit":
            rgb, caption = world.render(i)[0], world.caption(i, paraphrase=True)
            add(f"images/up_{n_done:04d}.png", styled(rgb), caption + TRIGGER, repeats)
            add(f"images/pair_{n_done:04d}.png", rgb, caption)
            n_done += 1
        i += 1
    for k in range(n_plain):
        add(f"images/plain_{k:04d}.png", world.render(i + k)[0], world.caption(i + k, paraphrase=True))
    path = out / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--styled", type=int, default=200)
    ap.add_argument("--plain", type=int, default=5000, help="plain items beyond the styled ones' upright pairs")
    ap.add_argument("--repeats", type=int, default=10, help="times each styled image is listed")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--number-share", type=float, default=0.5,
                    help="two-digit numbers among the plain items: the base's data.number_share (the preset's 0.5)")
    args = ap.parse_args()
    print(make(args.out, args.styled, args.plain, args.seed, args.repeats, args.number_share))


if __name__ == "__main__":
    main()
