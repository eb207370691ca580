"""Tests of patchflow.evaluate.clips: the clip checker of the moving-digits world agrees with the truth on real
held-out clips, reads a clip reversed in time as moving the other way, a still clip as moving nowhere, catches a
digit swapped in one frame and wrong colours, stays low on noise, counts unparsed prompts, reads .npz files with
clear errors, and scores the first frame of image-to-video clips.

The digit classifier is trained once per session (conftest: digit_classifier_training; under a minute on 2
free cores, minutes on a busy machine); everything else takes a few seconds.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from patchflow.data.moving_digits import DIRECTIONS, MovingDigitsDataset
from patchflow.data.worlds import compose, legible, paste
from patchflow.evaluate.clips import (
    MOTION, RATES, format_report, held_out_prompts, read_clips, real_reference, score_clips, score_first_frame,
    score_npz,
)
from patchflow.evaluate.digits import get_classifier

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="session")
def classifier(digit_classifier):
    return get_classifier(verbose=False)  # loaded from the session's cache, where conftest's one training put it


@pytest.fixture(scope="module")
def val():
    return MovingDigitsDataset("val", frames=9)


@pytest.fixture(scope="module")
def reference(classifier):
    return real_reference(100, frames=9, seed=0, classifier=classifier)


@pytest.fixture(scope="module")
def real(val):
    """100 held-out clips (uint8 (100, 9, 32, 32, 3)), their captions and attributes."""
    pairs = held_out_prompts(100, seed=0, frames=9)
    clips = np.stack([val.render(a["item"])[0] for _, a in pairs])
    return clips, [p for p, _ in pairs], [a for _, a in pairs]


def good_clip(reference, attrs, no_bounce=False) -> int:
    """Index of the first reference clip read right in every respect (and, if asked, with no bounce)."""
    return next(k for k, r in enumerate(reference.records)
                if r.correct["all"] and r.correct["same_digit"] and not (no_bounce and attrs[k]["bounces"]))


# ---- agreement with the truth on real clips -----------------------------------------------------------------
def test_real_clips_agree_with_their_captions(reference, real):
    # measured on these 100 clips: digit_frames 98.0%, same_digit, colors and direction 100%, all 98.0%; on 300
    # and on all 500 validation clips within 0.4% of that. The misses are the classifier's (a clip's digit is
    # one glyph, so it is read the same wrong way in every frame), and which glyphs it misses depends on the
    # machine's floating point (96.0% on a 2-core Xeon): a floor with room for that, as for color-digits' digits
    assert reference.n == 100 and reference.unparsed == 0
    assert reference.counts == {"clips": 100, "frames": 900, "tracked": 100, "smoothness": 100}
    assert reference.rates["colors"] == reference.rates["direction"] == reference.rates["same_digit"] == 1.0
    assert reference.rates["digit_frames"] >= 0.93 and reference.rates["all"] >= 0.93
    assert reference.rates["all"] <= reference.rates["digit_frames"]  # a clip is right in all only if every frame is
    # the world's motion is straight at a constant speed between bounces: both figures are 0 up to rounding
    assert reference.motion["smoothness"] < 1e-9 and reference.motion["jitter"] < 1e-9
    clips, _, attrs = real
    for seen, a in zip(read_clips(clips), attrs):
        assert seen.moved == a["direction"] and seen.speed == pytest.approx(a["speed"])
        assert len(seen.bounces) == len(a["bounces"])  # every bounce seen, none invented
        # the track moves exactly as the glyph does, and sits within 0.1 px of its recorded centre of mass
        assert np.allclose(np.diff(seen.track, axis=0), np.diff(np.array(a["com"]), axis=0), atol=1e-6)
        assert np.abs(seen.track - np.array(a["com"])).max() < 0.1
        dx, dy = seen.displacement
        along = dx if a["direction"] in ("left", "right") else dy
        assert abs(along) == pytest.approx(2 * a["speed"])  # frames 0-2: two steps at the clip's speed


def test_a_clip_reversed_in_time_moves_the_other_way(reference, real, classifier):
    clips, prompts, attrs = real
    still = [k for k in range(len(clips)) if not attrs[k]["bounces"]]
    assert {attrs[k]["direction"] for k in still} == set(DIRECTIONS)
    backwards = clips[still][:, ::-1].copy()
    report = score_clips(backwards, [prompts[k] for k in still], classifier)
    assert report.rates["direction"] == 0.0 and report.rates["colors"] == 1.0
    assert [r.seen.moved for r in report.records] == [OPPOSITE[attrs[k]["direction"]] for k in still]
    flipped = [prompts[k].replace(f"moving {attrs[k]['direction']}", f"moving {OPPOSITE[attrs[k]['direction']]}")
               for k in still]
    assert score_clips(backwards, flipped, classifier).rates["direction"] == 1.0


def test_a_still_clip_moves_nowhere(reference, real, classifier):
    clips, prompts, attrs = real
    k = good_clip(reference, attrs)
    frozen = np.repeat(clips[k:k + 1, :1], 9, axis=1)
    report = score_clips(frozen, [prompts[k]], classifier)
    r = report.records[0]
    assert r.seen.moved is None and r.seen.displacement == (0.0, 0.0) and not r.correct["direction"]
    assert r.correct["digit_frames"] == 1.0 and r.correct["same_digit"] and r.correct["colors"] == 1.0
    assert not r.correct["all"] and r.seen.smoothness == 0.0 and r.seen.jitter == 0.0


def test_a_different_digit_in_one_frame_breaks_same_digit(reference, real, val, classifier):
    clips, prompts, attrs = real
    k = good_clip(reference, attrs)
    a = attrs[k]
    # another held-out clip read right, of another digit: its glyph drawn in frame 4, same colours, same place
    o = next(j for j in range(len(attrs)) if attrs[j]["digit"] != a["digit"] and reference.records[j].correct["all"])
    glyph = val.glyphs.ink(attrs[o]["split_index"][0], *attrs[o]["glyph_size"])
    h, w = glyph.shape
    x, y = a["positions"][4]
    x, y = min(x, 31 - w), min(y, 31 - h)
    alpha = np.zeros((32, 32), np.float32)
    paste(alpha, glyph, x, y)
    swapped = clips[k].copy()
    swapped[4] = compose(alpha, a["color"], a["background"])
    r = score_clips(swapped[None], [prompts[k]], classifier).records[0]
    assert r.seen.digits[4] == attrs[o]["digit"] and r.seen.digits[:4] == (a["digit"],) * 4
    assert not r.correct["same_digit"] and not r.correct["all"]
    assert r.correct["digit_frames"] == pytest.approx(8 / 9) and r.correct["colors"] == 1.0
    assert r.correct["direction"]  # frames 0-2 are untouched
    # the same clip beside its original: frame 4 is the only one read wrong in one of the two
    report = score_clips(np.stack([swapped, clips[k]]), [prompts[k]] * 2, classifier)
    assert report.digit_by_frame == [1.0] * 4 + [0.5] + [1.0] * 4
    assert report.as_dict()["digit_by_frame"] == report.digit_by_frame
    assert "digit by frame: 100% 100% 100% 100% 50% 100%" in format_report(report)


def test_wrong_colours_fail_colors(reference, real, classifier):
    clips, prompts, attrs = real
    ks = [k for k in range(len(clips)) if reference.records[k].correct["all"]][:10]
    for field, make in (("color", lambda a, c: (c, a["background"])), ("background", lambda a, c: (a["color"], c))):
        wrong = []
        for k in ks:
            a = attrs[k]
            other = next(c for c in ("red", "blue", "white", "black", "green") if legible(*make(a, c))
                         and c not in (a["color"], a["background"]))
            color, background = make(a, other)
            d = prompts[k].split(" moving ")[0].split(" ")[-1]
            wrong.append(f"a {color} {d} moving {a['direction']} on a {background} background")
        report = score_clips(clips[ks], wrong, classifier)
        assert report.unparsed == 0 and report.rates["colors"] == 0.0 and report.rates["all"] == 0.0, field
        assert report.rates["direction"] == 1.0 and report.rates["digit_frames"] == 1.0


def test_noise_and_blank_clips_score_low(classifier):
    rng = np.random.default_rng(0)
    prompts = [p for p, _ in held_out_prompts(40, seed=1)]
    noise = rng.integers(0, 256, (40, 9, 32, 32, 3), dtype=np.uint8)
    report = score_clips(noise, prompts, classifier)
    # measured on 300 such clips: direction 0%, colors 0.4%, digit_frames 10%
    assert report.rates["direction"] <= 0.05 and report.rates["colors"] <= 0.05 and report.rates["all"] == 0.0
    assert report.rates["digit_frames"] <= 0.3
    blank = score_clips(np.zeros((3, 9, 32, 32, 3), np.uint8), prompts[:3], classifier)
    assert blank.rates == {"digit_frames": 0.0, "same_digit": 0.0, "colors": 0.0, "direction": 0.0, "all": 0.0}
    assert blank.counts["tracked"] == 0 and all(math.isnan(blank.motion[m]) for m in MOTION)
    assert blank.records[0].seen.moved is None and blank.records[0].seen.displacement is None


def test_smoothness_and_jitter_see_a_wobble_but_excuse_bounces(reference, real, classifier):
    clips, prompts, attrs = real
    bouncing = [k for k in range(len(clips)) if attrs[k]["bounces"]]
    assert len(bouncing) > 20 and all(read_clips(clips[k:k + 1])[0].smoothness < 1e-9 for k in bouncing[:10])
    k = next(k for k in range(len(clips)) if not attrs[k]["bounces"] and attrs[k]["direction"] in ("left", "right")
             and 3 <= attrs[k]["positions"][5][1] <= 31 - attrs[k]["size"] - 3)
    wobble = clips[k].copy()
    wobble[5] = np.roll(wobble[5], 2, axis=0)  # frame 5 two px lower: off the axis of motion
    seen = read_clips(wobble[None], classifier)[0]
    assert seen.jitter == pytest.approx(2 * 2 / 8)  # down 2 px and back up 2 px, over 8 steps
    # second differences at frames 4, 5, 6: 2, 4, 2 px/frame^2 out of 7
    assert seen.smoothness == pytest.approx((2 + 4 + 2) / 7) and seen.moved == attrs[k]["direction"]
    back = clips[k].copy()
    back[5], back[6] = clips[k][3], clips[k][2]  # a turn in the middle of the canvas is jitter, not a bounce
    assert read_clips(back[None], classifier)[0].smoothness > 0.5


# ---- prompts, files, reports ---------------------------------------------------------------------------------
def test_unparsable_prompts_are_counted_and_left_out(real, reference, classifier):
    clips, prompts, _ = real
    odd = ["hello", "a red 7 on a black background, in the center"] + prompts[2:10]
    report = score_clips(clips[:10], odd, classifier)
    assert report.unparsed == 2 and report.n == 10 and report.counts["clips"] == 8
    assert report.counts["frames"] == 72
    assert report.records[0].asked is None and report.records[0].seen is None and report.records[0].correct == {}
    assert report.rates == score_clips(clips[2:10], prompts[2:10], classifier).rates
    none = score_clips(clips[:2], ["hello", "a red 7 moving sideways on a black background"], classifier)
    assert none.unparsed == 2 and all(math.isnan(none.rates[r]) for r in RATES)


def test_npz_round_trip_and_errors(tmp_path, real, classifier):
    clips, prompts, _ = real
    path = tmp_path / "clips.npz"
    np.savez(path, videos=clips[:12], prompts=np.array(prompts[:12]))
    assert score_npz(path, classifier).as_dict() == score_clips(clips[:12], prompts[:12], classifier).as_dict()
    cases = {"no_videos.npz": ({"prompts": np.array(prompts[:2])}, "no 'videos' array"),
             "float.npz": ({"videos": clips[:2].astype(np.float32), "prompts": np.array(prompts[:2])}, "uint8"),
             "objects.npz": ({"videos": clips[:2], "prompts": np.array(prompts[:2], dtype=object)}, "str array"),
             "short.npz": ({"videos": clips[:2], "prompts": np.array(prompts[:3])}, "'videos' holds 2"),
             "images.npz": ({"videos": clips[:2, 0], "prompts": np.array(prompts[:2])}, r"\(N, T, 32, 32, 3\)")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            score_npz(tmp_path / name, classifier)
    with pytest.raises(ValueError, match="T >= 2"):
        score_clips(clips[:2, :1], prompts[:2], classifier)
    with pytest.raises(ValueError, match="one prompt per clip"):
        score_clips(clips[:2], prompts[:3], classifier)


def test_held_out_prompts_and_report(reference, classifier):
    pairs = held_out_prompts(5, seed=0, frames=9)
    assert pairs == held_out_prompts(5, seed=0, frames=9) and pairs != held_out_prompts(5, seed=1, frames=9)
    assert all(p == MovingDigitsDataset("val").caption(a["item"]) for p, a in pairs)
    assert len(held_out_prompts(3, frames=16)[0][1]["positions"]) == 16
    with pytest.raises(ValueError, match="n must be in 1..500"):
        held_out_prompts(501)
    table = format_report(reference, reference)
    assert table.startswith("| figure | over | generated | real |")
    for row in RATES + MOTION:
        assert f"| {row}" in table
    # each rate row: the figure, over what it is counted, the rate in percent to one decimal, in both columns; the
    # percentages are the classifier's readings (98.0% digit_frames on one machine, 96.0% on another), so they are
    # checked against the report's own rates, not pinned
    for attr in RATES:
        over = "900 frames" if attr in ("digit_frames", "colors") else "100 clips"
        row = next(line for line in table.splitlines() if line.startswith(f"| {attr} |"))
        figure = re.fullmatch(rf"\| {attr} \| {over} \| (\d{{1,3}}\.\d)% \| (\d{{1,3}}\.\d)% \|", row)
        assert figure, row
        assert figure[1] == figure[2] == f"{100 * reference.rates[attr]:.1f}", row
    assert "unparsed: 0 of 100 prompts" in table
    assert "real" not in format_report(reference).splitlines()[0]


def test_first_frame_error(real):
    clips, _, _ = real
    first = clips[:5, 0].copy()
    exact = score_first_frame(clips[:5], first)
    assert exact.mean == 0.0 and exact.per_clip.tolist() == [0.0] * 5
    brighter = np.clip(first.astype(int) + 12, 0, 255).astype(np.uint8)
    got = score_first_frame(clips[:5], brighter)
    expected = np.abs(brighter.astype(float) - first).mean(axis=(1, 2, 3))
    assert np.allclose(got.per_clip, expected) and got.mean == pytest.approx(expected.mean()) and got.mean <= 12
    with pytest.raises(ValueError, match="first_frames must be uint8"):
        score_first_frame(clips[:5], first[:4])
