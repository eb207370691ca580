"""Editing: image-to-image (strength), inpainting and outpainting (a mask), on latent and pixel runs, flows and
DDPM, images and clips; the mask read from what a user gives and pooled to latents; bad input."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from patchflow import codecs
from patchflow.config import load_config
from patchflow.data.color_digits import ColorDigitsDataset
from patchflow.data.moving_digits import MovingDigitsDataset
from patchflow.edit import latent_keep, read_mask
from patchflow.flow.config import FlowConfig
from patchflow.flow.objective import build_objective
from patchflow.media.read import read_image
from patchflow.pipeline import Pipeline
from patchflow.train.run import train

from run_helpers import cli

PROMPT = "a red 7 on a black background, in the center"
COMMON = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.sample_every=0",
          "train.checkpoint_every=2", "train.num_threads=1", "sample.steps=4"]
TEXT = ["model.arch=\"mmdit\"", "data.dataset=\"color-digits\"", "model.patch_size=2", "model.hidden_size=32",
        "model.depth=2", "model.num_heads=2", "model.text_dim=384", "model.pooled_dim=384", "text.cache=\"off\""]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_cache):
    """name -> run: `t2i` (MMDiT on the latents of a tiny color-digits codec), `ddpm` (a DDPM DiT on digit pixels),
    `t2v` (a pixel video run, 4 frames)."""
    base = tmp_path_factory.mktemp("edit")
    os.environ["PATCHFLOW_CACHE"] = str(session_cache)
    threads = torch.get_num_threads()
    codec = base / "codec"
    train(load_config("codec-color-digits", COMMON + ["model.channels=[8, 8]", "model.latent_channels=4"]), codec,
          progress=False)
    sets = {
        "t2i": (None, TEXT + [f"codec.source=\"{codec}\"", "codec.cache=\"off\"", "model.input_size=16",
                              "model.in_channels=4"]),
        "ddpm": ("digits-ddpm", ["model.preset=\"DiT-Micro/4\"", "codec.source=\"identity\"", "model.input_size=32",
                                  "model.in_channels=1"]),
        "t2v": (None, TEXT[1:] + ["model.arch=\"video\"", "model.frames=4", "data.dataset=\"moving-digits\"",
                                  "data.frames=4", "model.input_size=32", "model.in_channels=3",
                                  "model.patch_size=8", "codec.source=\"identity\""]),
    }
    out = {"codec": codec}
    for name, (preset, extra) in sets.items():
        out[name] = base / name
        train(load_config(preset, COMMON + extra), out[name], progress=False)
    torch.set_num_threads(threads)
    return out


def image(i: int = 3) -> np.ndarray:
    return ColorDigitsDataset("val").render(i)[0]


def round_trip(codec_run, x: np.ndarray) -> np.ndarray:
    codec = codecs.load(codec_run)
    z = codec.encode(torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1)
    y = codec.decode(z)[0].permute(1, 2, 0)
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def test_a_mask_of_zeros_returns_the_round_trip_and_of_ones_text_to_image(runs):
    pipe, x = Pipeline.load(runs["t2i"], device="cpu"), image()
    kept = pipe(prompt=PROMPT, n=2, init_image=x, mask=np.zeros((32, 32), np.uint8), seed=1)
    assert np.array_equal(kept, np.stack([round_trip(runs["codec"], x)] * 2))
    redrawn = pipe(prompt=PROMPT, n=2, init_image=x, mask=np.full((32, 32), 255, np.uint8), seed=1)
    assert np.array_equal(redrawn, pipe(prompt=PROMPT, n=2, seed=1))
    assert np.array_equal(pipe(prompt=PROMPT, n=1, init_image=x, strength=0.0)[0], round_trip(runs["codec"], x))


def test_strength_moves_from_the_input_to_a_new_sample(runs):
    pipe, x = Pipeline.load(runs["t2i"], device="cpu"), image()
    rt = round_trip(runs["codec"], x).astype(float)
    err = [np.abs(pipe(prompt=PROMPT, n=1, init_image=x, strength=s, seed=0)[0] - rt).mean() for s in (0.25, 1.0)]
    assert err[0] < err[1] / 2
    same = pipe(prompt=PROMPT, n=1, init_image=x, strength=1.0, seed=0)
    assert np.array_equal(same, pipe(prompt=PROMPT, n=1, seed=0))  # strength 1 ignores the input


def test_inpainting_keeps_every_latent_outside_the_mask(runs):
    pipe, x = Pipeline.load(runs["t2i"], device="cpu"), image()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:14] = 255
    captured = {}
    codec = pipe.codec
    decode = codec.decode
    codec.decode = lambda z: captured.setdefault("z", z.clone()) is not None and decode(z)
    try:
        pipe(prompt=PROMPT, n=1, init_image=x, mask=mask, seed=0)
    finally:
        codec.decode = decode
    z0 = codec.encode(torch.from_numpy(x).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1)
    z = captured["z"]
    f = 32 // z.shape[-1]  # pixels per latent side
    redrawn = torch.zeros(z.shape[-2:], dtype=torch.bool)
    redrawn[8 // f:-(-20 // f), 4 // f:-(-14 // f)] = True  # every latent the mask touches
    assert torch.equal(z[..., ~redrawn], z0[..., ~redrawn])
    assert not torch.allclose(z[..., redrawn], z0[..., redrawn])


def test_ddpm_and_ddim_edits_hold_the_unmasked_pixels_exactly(runs):
    pipe = Pipeline.load(runs["ddpm"], device="cpu")
    x = (np.random.default_rng(0).random((32, 32, 1)) * 255).astype(np.uint8).repeat(3, -1)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    for sampler in ("ddpm", "ddim"):
        out = pipe(labels=3, n=2, init_image=x, mask=mask, sampler=sampler, steps=5, seed=0)
        assert out.shape == (2, 32, 32, 1)
        assert np.array_equal(out[:, :, :16, 0], np.broadcast_to(x[:, :16, 0], (2, 32, 16)))
        assert not np.array_equal(out[:, :, 16:, 0], np.broadcast_to(x[:, 16:, 0], (2, 32, 16)))
        assert np.array_equal(pipe(labels=3, n=1, init_image=x, strength=0, sampler=sampler)[0, ..., 0], x[..., 0])
        near = pipe(labels=3, n=1, init_image=x, strength=0.2, sampler=sampler, steps=10, seed=0)[0, ..., 0]
        far = pipe(labels=3, n=1, init_image=x, strength=1.0, sampler=sampler, steps=10, seed=0)[0, ..., 0]
        assert np.abs(near - x[..., 0].astype(float)).mean() < np.abs(far - x[..., 0].astype(float)).mean()


def test_a_mask_per_frame_redraws_only_its_frames_of_a_clip(runs, tmp_path):
    pipe = Pipeline.load(runs["t2v"], device="cpu")
    clip = MovingDigitsDataset("val", frames=4).render(1)[0]
    masks = np.zeros((4, 32, 32), np.uint8)
    masks[2, 8:24, 8:24] = 255
    out = pipe(prompt="a red 7 moving left on a black background", n=1, video=clip, mask=masks, seed=0)[0]
    keep = np.ones((4, 32, 32), bool)
    keep[2, 8:24, 8:24] = False
    assert np.array_equal(out[keep], clip[keep]) and not np.array_equal(out[~keep], clip[~keep])
    one = pipe(prompt="a red 7 moving left on a black background", n=1, video=clip, mask=masks[2], seed=0)[0]
    assert np.array_equal(one[:, :8], clip[:, :8]) and not np.array_equal(one[:, 8:24, 8:24], clip[:, 8:24, 8:24])


def test_latent_keep_pools_the_redraw_mask_over_each_latents_footprint():
    redraw = np.zeros((5, 8, 8), np.float32)
    redraw[3, 1, 6] = 0.5  # one grey pixel in frame 3
    causal = type("Causal", (), {"time_factor": 2, "causal": True})()
    keep = latent_keep(redraw, (3, 2, 2), causal)  # frames {0}, {1, 2}, {3, 4}; 4x4 pixels a latent
    expected = torch.ones(1, 1, 3, 2, 2)
    expected[0, 0, 2, 0, 1] = 0.5
    assert torch.equal(keep, expected)
    plain = type("Plain", (), {"time_factor": 2, "causal": False})()
    assert latent_keep(np.ones((4, 8, 8), np.float32), (2, 8, 8), plain).shape == (1, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="does not tile"):
        latent_keep(np.ones((1, 6, 6), np.float32), (1, 4, 4))


def test_flow_keep_holds_the_kept_part_on_the_inputs_path():
    """With keep, every model input at a kept value is init noised to the current time: (1 - t) init + t noise."""
    obj = build_objective(FlowConfig(objective="rectified", shift=1.0))
    init, noise = torch.randn(2, 3, 1, 4, 4), torch.randn(2, 3, 1, 4, 4)
    keep = torch.zeros(2, 1, 1, 4, 4)
    keep[..., :2] = 1
    seen = []

    def model_fn(x, t):
        s = (t / 1000).reshape(-1, 1, 1, 1, 1)
        seen.append(((x - ((1 - s) * init + s * noise))[..., :2]).abs().max().item())
        return torch.ones_like(x)

    out = obj.sample(model_fn, noise, 6, "heun", init=init, keep=keep)
    assert max(seen) < 1e-5 and torch.equal(out[..., :2], init[..., :2])
    assert torch.allclose(out[..., 2:], noise[..., 2:] - 1, atol=1e-6)  # v = 1 over t from 1 to 0


def test_read_mask_takes_images_arrays_and_clips(tmp_path):
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "m.png")
    with pytest.warns(UserWarning, match="resized from 16x16 to 32x32"):
        m = read_mask(tmp_path / "m.png", (32, 32), frames=3)
    assert m.shape == (3, 32, 32) and m.min() == 1.0
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:4] = 255
    assert read_mask(rgb, (32, 32))[0, :4].min() == 1.0 and read_mask(rgb, (32, 32))[0, 4:].max() == 0.0
    assert read_mask(np.ones((32, 32), bool), (32, 32)).min() == 1.0
    assert read_mask(Image.fromarray(np.zeros((32, 32), np.uint8)), (32, 32)).max() == 0.0
    for bad, message in ((np.zeros((2, 32, 32), np.uint8), "2 masks for 3 frames"),
                         (np.zeros((32,), np.uint8), "shape"), (np.full((32, 32), 2.0), "float mask"),
                         (np.array([["a"]]), "not an image")):
        with pytest.raises(ValueError, match=message):
            read_mask(bad, (32, 32), frames=3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        read_mask(tmp_path / "bad.png", (32, 32))


def test_cli_inpaints_an_image_file_with_a_mask_file(runs, tmp_path, capsys):
    x = image()
    Image.fromarray(x).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")  # twice the size: resized with a warning
    with pytest.warns(UserWarning, match="mask: resized from 64x64 to 32x32"):
        code, said = cli(["sample", str(runs["t2i"]), "--prompt", PROMPT, "--n", "2", "--init-image",
                          str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--out",
                          str(tmp_path / "out.npz"), "--quiet"], capsys)
    assert code == 0, said
    with np.load(tmp_path / "out.npz") as f:
        out = f["images"]
    pipe = Pipeline.load(runs["t2i"], device="cpu")
    with pytest.warns(UserWarning, match="mask: resized"):
        assert np.array_equal(out, pipe(prompt=PROMPT, n=2, init_image=tmp_path / "in.png",
                                        mask=tmp_path / "mask.png", seed=0))
    left = round_trip(runs["codec"], x)[:, :8]  # latents far from the mask's edge decode as the input's
    assert np.abs(out[:, :, :8].astype(float) - left).mean() < 3


@pytest.mark.parametrize("run,flags,message", [
    ("t2i", ["--mask", "MASK"], "--mask needs the image it masks: give --init-image too"),
    ("t2i", ["--strength", "0.5"], "--strength goes with --init-image"),
    ("t2i", ["--init-image", "IMG", "--strength", "1.5"], "--strength must be in [0, 1]"),
    ("t2i", ["--init-image", "IMG", "--mask", "BAD"], "bad.png"),
    ("t2i", ["--init-image", "missing.png"], "--init-image"),
    ("t2v", ["--init-image", "IMG"], "edit a clip with --video-to-video"),
    ("t2v", ["--mask", "MASK"], "give --video-to-video too"),
])
def test_bad_edit_input_exits_2_with_a_message(runs, tmp_path, capsys, run, flags, message):
    Image.fromarray(image()).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "mask.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    names = {"IMG": str(tmp_path / "in.png"), "MASK": str(tmp_path / "mask.png"), "BAD": str(tmp_path / "bad.png"),
             "missing.png": str(tmp_path / "missing.png")}
    code, said = cli(["sample", str(runs[run]), "--prompt", PROMPT, "--n", "1", "--out", str(tmp_path / "o.npz"),
                      "--quiet", *[names.get(f, f) for f in flags]], capsys)
    assert code == 2 and message in said, said
    assert read_image(tmp_path / "in.png").shape == (32, 32, 3)  # nothing given was touched


def test_the_edit_scores_ask_for_another_colour_and_another_digit(runs, digit_classifier):
    """(digit_classifier: the session's one training of the checker's classifier, before the scores load it.)"""
    from patchflow.data.color_digits import parse_caption
    from patchflow.evaluate.edits import held_out_digits, ink_iou, inpaint, recolour

    pipe = Pipeline.load(runs["t2i"], device="cpu")
    data, items = held_out_digits(3)
    r = recolour(pipe, 3, steps=2)
    for i, prompt in zip(items, r["prompts"]):
        a, asked = data.attributes(i), parse_caption(prompt)
        assert asked["color"] != a["color"] and (asked["digit"], asked["background"]) == (a["digit"], a["background"])
    assert ink_iou(r["inputs"], r["inputs"]) == 1.0 and 0 <= r["shape_kept"] <= 1
    p = inpaint(pipe, 3, steps=2)
    for i, prompt, mask in zip(items, p["prompts"], p["masks"]):
        a, asked = data.attributes(i), parse_caption(prompt)
        assert asked["digit"] != a["digit"] and asked["color"] == a["color"]
        assert mask[data.render(i)[1] > 0].min() == 255  # the whole digit is masked out
    assert p["outside_error"] == 0.0  # outside the mask: the round trip
