"""Tests of patchflow.evaluate.prompts: the prompt-following checker of the color-digits world agrees with the
truth on real held-out images, catches a wrong colour, a wrong digit and a wrong position, counts unparsed
prompts, and reads .npz files with clear errors.

The digit classifier is trained once per session (conftest: digit_classifier_training; under a minute on 2
free cores, minutes on a busy machine); everything else takes a few seconds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from patchflow.data.color_digits import ColorDigitsDataset, parse_caption
from patchflow.data.worlds import COLORS, compose, glyphs
from patchflow.evaluate.digits import get_classifier
from patchflow.evaluate.prompts import (
    ATTRIBUTES, format_report, held_out_prompts, read_images, real_reference, score, score_npz,
)

# the acceptance floors on real held-out images (the checker's agreement with the truth)
FLOORS = {"background": 0.99, "color": 0.98, "position": 0.97, "digit": 0.93, "number": 0.85}


@pytest.fixture(scope="session")
def classifier(digit_classifier):
    return get_classifier(verbose=False)  # loaded from the session's cache, where conftest's one training put it


@pytest.fixture(scope="module")
def val():
    return ColorDigitsDataset("val")


@pytest.fixture(scope="module")
def reference(classifier):
    return real_reference(400, seed=0, classifier=classifier)


def centred_digit(val, classifier, colour_ok=lambda a: True) -> int:
    """The first validation item that is a centred single digit whose colours pass `colour_ok` and that the
    classifier reads right. Which glyphs it misreads depends on the machine's floating point (the first centred
    digit, a 5, is read with a margin of only ~0.4 on one machine), and its misses are not what these tests are
    about."""
    return next(i for i in range(len(val)) if val.attributes(i)["kind"] == "digit"
                and val.attributes(i)["position"] == "centre" and colour_ok(val.attributes(i))
                and read_images(val.render(i)[0][None], [1], classifier=classifier)[0].digits
                == (val.attributes(i)["digit"],))


# ---- agreement with the truth on real images --------------------------------------------------------------
def test_real_images_agree_with_their_captions(reference):
    assert reference.n == 400 and reference.unparsed == 0
    assert reference.counts["color"] == reference.counts["background"] == reference.counts["all"] == 400
    assert reference.counts["digit"] == reference.counts["position"] > 250
    assert reference.counts["digit"] + reference.counts["number"] == 400 and reference.counts["number"] > 60
    for attr, floor in FLOORS.items():
        assert reference.rates[attr] >= floor, (attr, reference.rates[attr])
    assert reference.rates["color"] == reference.rates["background"] == reference.rates["position"] == 1.0
    # `all` is every asked attribute at once: with colours and positions all right, the digits and numbers read
    right = sum(reference.rates[a] * reference.counts[a] for a in ("digit", "number"))
    assert reference.rates["all"] * 400 == pytest.approx(right) and reference.rates["all"] >= 0.9
    r = next(r for r in reference.records if r.asked["kind"] == "number" and r.correct["number"])
    assert r.seen.digits == r.asked["digits"] and set(r.correct) == {"color", "background", "number", "all"}


def test_paraphrased_prompts_are_scored_like_canonical_ones(classifier):
    report = real_reference(200, seed=1, kind="paraphrase", classifier=classifier)
    assert report.unparsed == 0 and report.n == 200
    assert report.rates["color"] == report.rates["background"] == report.rates["position"] == 1.0
    assert report.rates["digit"] >= FLOORS["digit"] and report.rates["number"] >= FLOORS["number"]


def test_held_out_prompts_come_from_the_validation_split():
    val_digits = set(glyphs("val", 0).index)
    pairs = held_out_prompts(50, seed=3)
    assert len(pairs) == 50 and len({a["item"] for _, a in pairs}) == 50
    assert all(set(a["mnist_index"]) <= val_digits for _, a in pairs)
    data = ColorDigitsDataset("val")
    assert all(p == data.caption(a["item"]) for p, a in pairs)
    assert pairs == held_out_prompts(50, seed=3) and pairs != held_out_prompts(50, seed=4)
    assert all(a["kind"] == "number" and p.startswith("the number ") for p, a in held_out_prompts(40, kind="number"))
    assert all(a["kind"] == "digit" for _, a in held_out_prompts(40, kind="digit"))
    for p, a in held_out_prompts(100, kind="paraphrase"):
        assert p == data.caption(a["item"], paraphrase=True)
        assert all(parse_caption(p)[k] == a[k] for k in ("digits", "color", "background", "position"))
    with pytest.raises(ValueError, match="kind"):
        held_out_prompts(5, kind="video")
    with pytest.raises(ValueError, match="n must be in 1..2"):  # about 250 numbers among 1,000 items
        held_out_prompts(600, kind="number")


# ---- what a wrong image scores -----------------------------------------------------------------------------
def test_a_wrong_colour_is_seen_as_that_colour(val, classifier):
    i = centred_digit(val, classifier, lambda a: a["background"] == "black" and a["color"] == "red")
    a = val.attributes(i)
    _, alpha = val.render(i)
    blue = compose(alpha, "blue", "black")  # the right digit, drawn blue instead of red
    report = score(np.stack([val.render(i)[0], blue]), [val.caption(i)] * 2, classifier=classifier)
    right, wrong = report.records
    assert right.correct == {"color": True, "background": True, "digit": True, "position": True, "all": True}
    assert wrong.seen.color == "blue" and wrong.correct["color"] is False and wrong.correct["all"] is False
    assert wrong.correct["background"] and wrong.correct["digit"] and wrong.seen.digits == (a["digit"],)
    assert report.rates["color"] == 0.5 and report.rates["background"] == 1.0 and report.counts["color"] == 2
    # a wrong background is caught the same way
    report = score(compose(alpha, "red", "white")[None], [val.caption(i)], classifier=classifier)
    assert report.records[0].seen.background == "white" and report.rates["background"] == 0.0


def test_a_shifted_digit_is_seen_at_its_shift(val, classifier):
    i = centred_digit(val, classifier)
    a = val.attributes(i)
    rgb, alpha = val.render(i)
    x0, y0, x1, y1 = a["bbox"]
    images, expected, shifts = [], [], []
    for position, (dx, dy) in {"left": (-4, 0), "right": (4, 0), "top": (0, -4), "bottom": (0, 4)}.items():
        if not (1 <= x0 + dx and x1 + dx <= 31 and 1 <= y0 + dy and y1 + dy <= 31):
            continue  # this glyph is too large to move 4 px that way
        moved = np.zeros_like(alpha)
        moved[y0 + dy:y1 + dy, x0 + dx:x1 + dx] = alpha[y0:y1, x0:x1]
        images.append(compose(moved, a["color"], a["background"]))
        expected.append(position)
        shifts.append((dx, dy))
    assert len(expected) >= 2
    readings = read_images(np.stack(images), [1] * len(images), classifier=classifier)
    assert [r.position for r in readings] == expected
    for r, (dx, dy) in zip(readings, shifts):  # the centre of mass seen moved by exactly the shift
        assert r.offset == pytest.approx((a["offset"][0] + dx, a["offset"][1] + dy), abs=0.02)
    # scored against the centred caption they are wrong on position only; against their own they are right
    report = score(np.stack(images), [val.caption(i)] * len(images), classifier=classifier)
    assert report.rates["position"] == 0.0 and report.rates["color"] == report.rates["digit"] == 1.0
    base = val.caption(i).rsplit(", ", 1)[0]
    phrases = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    report = score(np.stack(images), [f"{base}, {phrases[p]}" for p in expected], classifier=classifier)
    assert report.rates["position"] == 1.0 and report.rates["all"] == 1.0


def test_a_wrong_digit_and_a_blank_image(val, classifier):
    i = centred_digit(val, classifier)
    a = val.attributes(i)
    other = (a["digit"] + 1) % 10
    prompt = val.caption(i).replace(f" {a['digit']} on ", f" {other} on ")
    blank = np.zeros((32, 32, 3), np.uint8) + np.array(COLORS[a["background"]], np.uint8)
    report = score(np.stack([val.render(i)[0], blank]), [prompt, val.caption(i)], classifier=classifier)
    wrong, empty = report.records
    assert wrong.correct["digit"] is False and wrong.correct["color"] and wrong.correct["position"]
    assert empty.seen.color is None and empty.seen.digits == () and empty.seen.position is None
    assert empty.correct["background"] and not empty.correct["color"] and not empty.correct["all"]


def test_unparsed_prompts_are_counted_not_scored(val, classifier):
    images = np.stack([val.render(i)[0] for i in range(4)])
    prompts = ["hello", val.caption(1), "a purple 7 on a black background", 42]
    report = score(images, prompts, classifier=classifier)
    assert report.unparsed == 3 and report.n == 4 and report.counts["all"] == 1
    assert [r.asked is None for r in report.records] == [True, False, True, True]
    assert report.records[0].seen is None and report.records[0].correct == {}
    report = score(images[:1], ["hello"], classifier=classifier)
    assert report.unparsed == 1 and all(report.counts[a] == 0 and math.isnan(report.rates[a]) for a in ATTRIBUTES)
    assert "unparsed: 1 of 1 prompts" in format_report(report)
    with pytest.raises(ValueError, match="prompts"):
        score(images, prompts[:3], classifier=classifier)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        score(images[..., 0], prompts, classifier=classifier)
    with pytest.raises(ValueError, match="uint8"):
        score(images.astype(np.float32), prompts, classifier=classifier)


def test_format_report_puts_the_model_beside_the_real_ceiling(reference):
    text = format_report(reference, reference)
    lines = text.splitlines()
    assert lines[0].split() == ["attribute", "prompts", "model", "real"]
    row = {line.split()[0]: line.split() for line in lines[2:2 + len(ATTRIBUTES)]}
    assert set(row) == set(ATTRIBUTES)
    assert row["color"] == ["color", "400", "100.0%", "100.0%"]
    assert row["digit"][2] == f"{100 * reference.rates['digit']:.1f}%" and row["digit"][2] == row["digit"][3]
    assert "real" not in format_report(reference).splitlines()[0]
    assert reference.as_dict()["counts"]["color"] == 400


# ---- .npz files ------------------------------------------------------------------------------------------
def test_score_npz(tmp_path, val, classifier):
    images = np.stack([val.render(i)[0] for i in range(40)])
    prompts = np.array([val.caption(i) for i in range(40)])
    path = tmp_path / "samples.npz"
    np.savez(path, images=images, prompts=prompts)
    report = score_npz(path, classifier=classifier)
    assert report.n == 40 and report.unparsed == 0 and report.rates["color"] == 1.0 and report.counts["number"] > 0
    assert report.as_dict() == score(images, list(prompts), classifier=classifier).as_dict()
    cases = {"no_images": ({"prompts": prompts}, "'images'.*\\(N, 32, 32, 3\\)"),
             "no_prompts": ({"images": images}, "'prompts'"),
             "float": ({"images": images.astype(np.float32), "prompts": prompts}, "'images'.*uint8"),
             "grey": ({"images": images[..., 0], "prompts": prompts}, "'images'.*\\(N, 32, 32, 3\\)"),
             "short": ({"images": images, "prompts": prompts[:5]}, "'prompts'.*\\(N,\\)"),
             "numbers": ({"images": images, "prompts": np.arange(40)}, "'prompts'.*str"),
             "objects": ({"images": images, "prompts": np.array(list(prompts), dtype=object)}, "'prompts'.*str")}
    for name, (arrays, message) in cases.items():
        bad = tmp_path / f"{name}.npz"
        np.savez(bad, **arrays)
        with pytest.raises(ValueError, match=message):
            score_npz(bad, classifier=classifier)


def test_evaluate_pipeline_samples_with_the_asked_sampler_steps_and_guidance(val, classifier):
    from types import SimpleNamespace

    from patchflow.evaluate.text_run import evaluate_pipeline

    calls = []

    class Pipe:  # the real held-out images of the prompts asked, so the figures are the reference's
        cfg = SimpleNamespace(data=SimpleNamespace(seed=0))

        def __call__(self, prompt, **kwargs):
            calls.append((len(prompt), kwargs["sampler"], kwargs["steps"], kwargs["guidance"]))
            return np.stack([val.render(a["item"])[0] for _, a in held_out_prompts(len(prompt), seed=3)])

    result = evaluate_pipeline(Pipe(), {"canonical": 20}, seed=3, steps=7, guidance=2.0, sampler="heun")
    assert calls == [(20, "heun", 7, 2.0)]
    assert result["canonical"]["model"]["rates"] == result["canonical"]["real"]["rates"]
