"""How well a codec keeps what matters in the built-in worlds: PSNR, digit identity and colours.

On held-out items of a world (validation split) the codec reconstructs x -> decode(encode(x)), then:
- **psnr_db**: mean PSNR over items (pixels in [-1, 1], peak-to-peak 2);
- **digit accuracy**: the digit classifier (`evaluate.digits`) on originals and on reconstructions. For the colour
  worlds a pixel's "ink" is its position between the item's background and digit colours (a luminance that does
  not depend on which colours were drawn), and each glyph is cut out and centred like an MNIST digit;
- **colours** (colour worlds): the mean RGB error (0..255) on stroke and background pixels, and how often the
  nearest named colour of the reconstruction's stroke / background is the item's.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from patchflow.data.worlds import COLORS
from patchflow.pipeline import to_uint8

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
NAMES = list(COLORS)


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-item PSNR (dB) of reconstructions a (clamped to [-1, 1]) against originals b; peak-to-peak 2."""
    err = (a.float().clamp(-1, 1) - b.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / err.clamp(min=1e-12))).numpy()


def ink(rgb: np.ndarray, color, background) -> np.ndarray:
    """uint8 (H, W, 3) -> float (H, W) in [0, 1]: 0 at the background colour, 1 at the digit colour."""
    fg, bg = np.asarray(color, np.float64), np.asarray(background, np.float64)
    d = fg - bg
    return np.clip((rgb.astype(np.float64) - bg) @ d / (d @ d), 0.0, 1.0)


def mnist_crop(ink_map: np.ndarray, box) -> np.ndarray:
    """The glyph in box (x, y, w, h) of an ink map, scaled to fit 20x20 and centred by mass in 32x32, uint8."""
    x, y, w, h = box
    crop = ink_map[y:y + h, x:x + w]
    scale = 20.0 / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    glyph = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.BILINEAR), np.float64)
    out = np.zeros((32, 32))
    total = glyph.sum()
    cy, cx = ((np.indices(glyph.shape) * glyph).reshape(2, -1).sum(1) / total) if total > 0 else \
        (glyph.shape[0] / 2, glyph.shape[1] / 2)
    top, left = int(round(15.5 - cy)), int(round(15.5 - cx))
    top, left = min(max(top, 0), 32 - size[1]), min(max(left, 0), 32 - size[0])
    out[top:top + size[1], left:left + size[0]] = glyph
    return out.clip(0, 255).astype(np.uint8)


def _nearest_color(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(1)))]


@torch.no_grad()
def reconstruct(codec, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([codec.decode(codec.encode(x[i:i + batch])) for i in range(0, len(x), batch)])


def evaluate_codec(codec, world: str, n: int = 500, frames: int = 9) -> dict:
    """Scores of `codec` on n held-out items of a built-in world ("digits", "color-digits", "moving-digits")."""
    from patchflow.evaluate.digits import get_classifier

    classifier = get_classifier(verbose=False)  # trained on first use: outside no_grad
    with torch.no_grad():
        return _scores(codec, world, n, frames, classifier)


def _scores(codec, world: str, n: int, frames: int, classifier) -> dict:
    from patchflow.evaluate.digits import to_classifier_input

    def accuracy(images: np.ndarray, labels: np.ndarray) -> float:
        pred = classifier(to_classifier_input(images)).argmax(1).numpy()
        return float((pred == labels).mean())

    if world == "digits":
        from patchflow.data.digits import DigitsDataset

        data = DigitsDataset("val")
        n = min(n, len(data))
        x, labels = data.images[:n], data.labels[:n].numpy()
        recon = reconstruct(codec, x)
        return {"world": world, "n": n, "psnr_db": float(psnr(recon, x).mean()),
                "compression": codec.compression(tuple(x.shape)), "accuracy_original": accuracy(to_uint8(x)[:, 0], labels),
                "accuracy_reconstructed": accuracy(to_uint8(recon)[:, 0], labels)}
    if world == "color-digits":
        from patchflow.data.color_digits import ColorDigitsDataset

        data = ColorDigitsDataset("val")
    elif world == "moving-digits":
        from patchflow.data.moving_digits import MovingDigitsDataset

        data = MovingDigitsDataset("val", frames=frames)
    else:
        raise ValueError(f"unknown world {world!r}; choose digits, color-digits or moving-digits")
    n = min(n, len(data))
    x = torch.stack([data[i][0] for i in range(n)])
    recon = reconstruct(codec, x)
    orig8, recon8 = to_uint8(x), to_uint8(recon)
    crops_o, crops_r, labels, stroke_err, bg_err, color_ok, bg_ok = [], [], [], [], [], [], []
    for i in range(n):
        a = data.attributes(i)
        _, alpha = data._render(i, a)  # (T, H, W) stroke coverage
        for t in range(orig8.shape[1]):
            o, r = orig8[i, t], recon8[i, t]
            stroke, bg = alpha[t] > 0.9, alpha[t] < 0.05
            stroke_err.append(np.abs(r[stroke].astype(float) - o[stroke]).mean())
            bg_err.append(np.abs(r[bg].astype(float) - o[bg]).mean())
            color_ok.append(_nearest_color(r[stroke].mean(0)) == a["color"])
            bg_ok.append(_nearest_color(np.median(r[bg], 0)) == a["background"])
            if a["kind"] != "digit":
                continue  # numbers: two glyphs; their digits are scored in text-to-image, not here
            if "positions" in a:
                box = (*a["positions"][t], a["width"], a["size"])
            else:
                box = a["boxes"][0]
            crops_o.append(mnist_crop(ink(o, a["color_rgb"], a["background_rgb"]), box))
            crops_r.append(mnist_crop(ink(r, a["color_rgb"], a["background_rgb"]), box))
            labels.append(a["digit"])
    labels = np.asarray(labels)
    return {"world": world, "n": n, "frames": int(orig8.shape[1]), "psnr_db": float(psnr(recon, x).mean()),
            "compression": codec.compression(tuple(x.shape)),
            "accuracy_original": accuracy(np.stack(crops_o), labels),
            "accuracy_reconstructed": accuracy(np.stack(crops_r), labels),
            "stroke_rgb_error": float(np.mean(stroke_err)), "background_rgb_error": float(np.mean(bg_err)),
            "stroke_color_kept": float(np.mean(color_ok)), "background_color_kept": float(np.mean(bg_ok))}
