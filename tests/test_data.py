"""User data sets: image folders, caption files, video clips; conversion, skipping, errors, config wiring.

Every image is written by the test into tmp_path; the whole file runs in seconds on one CPU core.
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from patchflow.config import ConfigError, DataConfig, load_config
from patchflow.data import ResumableBatchSampler, build_dataset
from patchflow.data.captions import ImageCaptionDataset
from patchflow.data.folder import ImageFolderDataset
from patchflow.data.images import load_image
from patchflow.data.skipping import BadDataWarning
from patchflow.data.video import VideoFolderDataset

RED = (255, 0, 0)


# ---- helpers -------------------------------------------------------------------------------------
def collect(fn, *args, **kwargs):
    """(fn's result, [messages of the BadDataWarnings it raised]), every warning shown (no dedup)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, BadDataWarning)]


def pixels(x: torch.Tensor) -> np.ndarray:
    """(C, 1, H, W) in [-1, 1] -> (H, W, C) in 0..255 as floats."""
    return ((x[:, 0].permute(1, 2, 0) + 1) * 127.5).numpy()


def solid(path, mode, size, color, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def noise_rgb(path, size=(48, 40), seed=0, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, **save)
    return path


def truncate(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def one(path, size=8, channels=3, background="white"):
    """The (H, W, C) pixels of one file through the data set's loader (check=True exercises the scan path)."""
    load_image(path, size, channels, background, check=True)
    return pixels(load_image(path, size, channels, background)[:, None])


def gif(path, colors, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", size, c) for c in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


# ---- conversion ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_red_becomes_rgb_red(tmp_path, fmt):
    p = solid(tmp_path / f"red.{fmt.lower()}", "CMYK", (8, 8), (0, 255, 255, 0), format=fmt)
    assert Image.open(p).mode == "CMYK"
    x = load_image(p, 8)
    tol = 0 if fmt == "TIFF" else 0.03  # JPEG is lossy
    assert torch.allclose(x[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]), atol=tol + 1e-6)


def test_sixteen_bit_gray_keeps_high_byte_not_clipped(tmp_path):
    levels = np.arange(256, dtype=np.uint16) * 256 + 200  # high byte k, low byte 200 (dropped, not rounded)
    Image.fromarray(levels.reshape(16, 16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = one(tmp_path / "g16.png", size=16, channels=1)[..., 0].round().astype(int).ravel()
    assert got.tolist() == list(range(256))  # PIL's convert("L") would make all but the first white
    # 32-bit "I" (TIFF) with 16-bit values: the same mapping; grey repeated into RGB
    Image.fromarray((np.arange(256, dtype=np.int32) * 257).reshape(16, 16)).save(tmp_path / "i32.tif")
    rgb = one(tmp_path / "i32.tif", size=16, channels=3).round().astype(int).reshape(-1, 3)
    assert (rgb[:, 0] == np.arange(256)).all() and (rgb == rgb[:, :1]).all()


@pytest.mark.parametrize("background,value", [("white", 255), ("black", 0)])
def test_palette_with_transparency_is_composited(tmp_path, background, value):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    im.paste(1, (0, 0, 4, 8))
    im.save(tmp_path / "p.png", transparency=0)
    px = one(tmp_path / "p.png", background=background)
    assert np.allclose(px[4, 1], (0, 0, 255))  # opaque blue stays blue
    assert np.allclose(px[4, 6], (value,) * 3)  # the transparent red is the background, not red
    im.save(tmp_path / "p.gif", transparency=0)  # GIF palette transparency
    assert np.allclose(one(tmp_path / "p.gif", background=background)[4, 6], (value,) * 3)


def test_alpha_is_composited_on_the_background(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # red stored under alpha 0
    rgba.paste((0, 255, 0, 255), (0, 0, 4, 8))
    rgba.paste((0, 0, 0, 128), (4, 0, 8, 2))  # half-transparent black
    rgba.save(tmp_path / "a.png")
    white, black = one(tmp_path / "a.png"), one(tmp_path / "a.png", background="black")
    assert np.allclose(white[4, 1], (0, 255, 0)) and np.allclose(black[4, 1], (0, 255, 0))
    assert np.allclose(white[4, 6], (255, 255, 255)) and np.allclose(black[4, 6], (0, 0, 0))
    assert np.allclose(white[0, 6], 127, atol=1)  # 50% black over white
    la = Image.new("LA", (8, 8), (10, 0))
    la.save(tmp_path / "la.png")
    assert np.allclose(one(tmp_path / "la.png", channels=1), 255)
    assert np.allclose(one(tmp_path / "la.png", background="black"), 0)
    rgba.save(tmp_path / "a.webp", lossless=True)
    assert np.allclose(one(tmp_path / "a.webp")[4, 6], (255, 255, 255), atol=1)


def test_grey_repeats_to_rgb_and_rgb_to_luma(tmp_path):
    solid(tmp_path / "g.png", "L", (8, 8), 100)
    assert np.allclose(one(tmp_path / "g.png"), 100)  # all three channels
    solid(tmp_path / "one_bit.bmp", "1", (8, 8), 1)
    assert np.allclose(one(tmp_path / "one_bit.bmp"), 255)
    solid(tmp_path / "red.png", "RGB", (8, 8), RED)
    assert np.allclose(one(tmp_path / "red.png", channels=1), round(255 * 0.299), atol=1)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("L", (8, 4), 0)
    im.paste(255, (4, 0, 8, 4))  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": left half goes to the top
    im.save(tmp_path / "e.png", exif=exif)
    px = one(tmp_path / "e.png", size=4, channels=1)[..., 0]
    assert np.allclose(px[:2], 0) and np.allclose(px[2:], 255)
    pal = Image.new("P", (8, 4), 0)  # rotation keeps a palette's transparency
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 4, 4))
    pal.save(tmp_path / "p.png", transparency=0, exif=exif)
    px = one(tmp_path / "p.png", size=4)
    assert np.allclose(px[:2], (0, 0, 255)) and np.allclose(px[2:], 255)


def test_shorter_side_resized_then_centre_cropped(tmp_path):
    im = Image.new("RGB", (96, 32), (0, 0, 255))
    im.paste(RED, (32, 0, 64, 32))  # the centre third is red
    im.save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)
    assert torch.allclose(x[:, 8, 2], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)  # the crop is the red third
    assert x[0, 8, 0] > 0.5 and x[2, 8, 0] < 0  # only the bicubic border sees the blue
    noise_rgb(tmp_path / "small.png", size=(5, 7))  # smaller than image_size: scaled up
    assert load_image(tmp_path / "small.png", 16).shape == (3, 16, 16)


# ---- image folders -------------------------------------------------------------------------------
def make_bad_files(folder):
    """Four unreadable files with image extensions; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = [truncate(noise_rgb(folder / "src.png", seed=7), folder / "cut.png"),
           truncate(noise_rgb(folder / "src.jpg", seed=8, quality=90), folder / "cut.jpg"),
           folder / "garbage.png", folder / "empty.jpeg"]
    (folder / "src.png").unlink()
    (folder / "src.jpg").unlink()
    bad[2].write_bytes(b"not an image at all" * 5)
    bad[3].write_bytes(b"")
    return bad


def test_class_folders_sorted_labels_and_corrupt_files_skipped(tmp_path):
    solid(tmp_path / "zebra" / "1.png", "RGB", (10, 12), RED)
    solid(tmp_path / "apple" / "b.png", "L", (12, 10), 50)
    solid(tmp_path / "apple" / "sub" / "a.PNG", "RGB", (8, 8), RED)  # nested, upper-case extension
    solid(tmp_path / "apple" / "a.jpg", "RGB", (8, 8), RED)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    solid(tmp_path / ".hidden" / "x.png", "RGB", (8, 8), RED)
    solid(tmp_path / "apple" / ".thumb.png", "RGB", (8, 8), RED)
    bad = make_bad_files(tmp_path / "zebra")
    ds, msgs = collect(ImageFolderDataset, tmp_path, 8)
    assert ds.classes == ["apple", "zebra"] and ds.num_classes == 2
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["apple/a.jpg", "apple/b.png", "apple/sub/a.PNG",
                                                                        "zebra/1.png"]
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 0, 1]
    assert len(ds.skipped) == len(bad) == 4
    assert sorted(name for name, _ in ds.skipped) == sorted(str(p) for p in bad)
    for p in bad:  # exactly one warning per bad file, naming it
        assert sum(str(p) in m for m in msgs) == 1, (p, msgs)
    assert msgs[-1] == "skipped 4 of 8 images (see warnings)"
    x, y = ds[1]
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and np.allclose(pixels(x), 50)
    again, _ = collect(ImageFolderDataset, tmp_path, 8)  # the order is a function of the folder alone
    assert again.items == ds.items


def test_flat_folder_is_label_zero_and_loose_files_beside_classes_are_warned(tmp_path):
    for i in range(3):
        solid(tmp_path / f"{i}.png", "RGB", (8, 8), RED)
    ds, msgs = collect(ImageFolderDataset, tmp_path, 8)
    assert len(ds) == 3 and ds.classes == [] and ds.num_classes == 1 and {ds[i][1] for i in range(3)} == {0}
    assert msgs == []
    solid(tmp_path / "cls" / "a.png", "RGB", (8, 8), RED)
    ds, msgs = collect(ImageFolderDataset, tmp_path, 8)
    assert len(ds) == 1 and any("3 image files directly in" in m for m in msgs)


def test_empty_missing_and_all_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no images in .*\.png, \.jpg.*\.tiff"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images in " + str(tmp_path)):
        ImageFolderDataset(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8)
    with pytest.raises(NotADirectoryError, match="not a folder"):
        ImageFolderDataset(tmp_path / "readme.txt", 8)
    with pytest.raises(ValueError, match="path is empty"):
        ImageFolderDataset("", 8)
    make_bad_files(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"none of the 4 images .* could be read \(the first: .*cut"):
        collect(ImageFolderDataset, tmp_path / "bad", 8)


def test_empty_class_keeps_its_label_and_is_warned(tmp_path):
    solid(tmp_path / "a" / "1.png", "RGB", (8, 8), RED)
    (tmp_path / "b").mkdir()
    solid(tmp_path / "c" / "1.png", "RGB", (8, 8), RED)
    ds, msgs = collect(ImageFolderDataset, tmp_path, 8)
    assert [ds[i][1] for i in range(len(ds))] == [0, 2] and ds.num_classes == 3
    assert any("label 1" in m and str(tmp_path / "b") in m for m in msgs)


def test_file_broken_after_the_scan_is_replaced_deterministically(tmp_path):
    for i, v in enumerate((10, 20, 30)):
        solid(tmp_path / f"{i}.png", "L", (8, 8), v)
    ds, _ = collect(ImageFolderDataset, tmp_path, 8, channels=1)
    (tmp_path / "1.png").write_bytes(b"broken later")
    (x, y), msgs = collect(ds.__getitem__, 1)
    assert np.allclose(pixels(x), 30)  # item 2 stands in for item 1
    assert len(msgs) == 1 and str(tmp_path / "1.png") in msgs[0]
    (x2, _), msgs2 = collect(ds.__getitem__, 1)
    assert torch.equal(x, x2) and msgs2 == []  # same substitute, warned once
    (tmp_path / "2.png").unlink()
    (tmp_path / "0.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="none of the 3 files"):
        collect(ds.__getitem__, 0)
    with pytest.raises(IndexError):
        ds[3]


# ---- captions ------------------------------------------------------------------------------------
def test_captions_skip_bad_lines_with_line_numbers_or_raise_when_strict(tmp_path):
    solid(tmp_path / "imgs" / "a.png", "RGB", (8, 8), RED)
    solid(tmp_path / "b.png", "L", (8, 8), 0)
    truncate(noise_rgb(tmp_path / "src.png"), tmp_path / "cut.png")
    lines = [json.dumps({"image": "imgs/a.png", "caption": "a red square"}),      # 1 ok
             json.dumps({"image": "imgs/a.png"}),                                # 2 no caption
             json.dumps({"image": "imgs/a.png", "caption": "   "}),              # 3 empty caption
             "",                                                                 # 4 blank: ignored
             json.dumps({"image": "missing.png", "caption": "x"}),               # 5 no such file
             '{"image": "imgs/a.png", "caption": ',                              # 6 bad JSON
             json.dumps({"image": str(tmp_path / "b.png"), "caption": "black"}), # 7 ok, absolute path
             json.dumps({"image": "cut.png", "caption": "truncated"}),           # 8 corrupt image
             json.dumps(["not", "an", "object"])]                                # 9 not an object
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds, msgs = collect(ImageCaptionDataset, path, 8)
    assert len(ds) == 2 and [ds[i][1] for i in range(2)] == ["a red square", "black"]
    assert ds[0][0].shape == (3, 1, 8, 8) and np.allclose(pixels(ds[1][0]), 0)
    bad_lines = [2, 3, 5, 6, 8, 9]
    assert [name for name, _ in ds.skipped] == [f"line {n} of {path}" for n in bad_lines]
    for n in bad_lines:
        assert sum(f"line {n} of " in m for m in msgs) == 1
    assert msgs[-1] == "skipped 6 of 8 caption entries (see warnings)"
    reasons = dict(ds.skipped)
    assert "missing 'caption'" in reasons[f"line 2 of {path}"] and "empty 'caption'" in reasons[f"line 3 of {path}"]
    assert "does not exist" in reasons[f"line 5 of {path}"] and "not valid JSON" in reasons[f"line 6 of {path}"]
    with pytest.raises(ValueError, match=r"captions.jsonl:2: missing 'caption'"):
        ImageCaptionDataset(path, 8, strict=True)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 1, 8, 8) and list(batch[1]) == ["a red square", "black"]


def test_captions_file_missing_or_without_usable_entries(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file .* does not exist"):
        ImageCaptionDataset(tmp_path / "none.jsonl", 8)
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "x.png", "caption": "y"}) + "\n")
    with pytest.raises(ValueError, match="no usable image-caption entries: 1 non-blank lines, 1 skipped"):
        collect(ImageCaptionDataset, tmp_path / "c.jsonl", 8)


# ---- video ---------------------------------------------------------------------------------------
FRAME_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def first_pixels(x):
    """(C, T, H, W) -> the RGB of the centre pixel of every frame, 0..255 ints."""
    return [tuple(round(v) for v in ((x[:, t, 4, 4] + 1) * 127.5).tolist()) for t in range(x.shape[1])]


def test_video_gifs_and_frame_folders_in_order(tmp_path):
    gif(tmp_path / "clip_a.gif", FRAME_COLORS)
    frames = tmp_path / "clip_b"
    for i, v in enumerate([10, 20, 30]):  # natural order: frame2 before frame10
        solid(frames / f"frame{[2, 10, 1][i]}.png", "L", (8, 8), v)
    ds, msgs = collect(VideoFolderDataset, tmp_path, 3, 8)
    assert msgs == [] and [c.name for c in ds.clips] == ["clip_a.gif", "clip_b"]
    x, y = ds[0]
    assert x.shape == (3, 3, 8, 8) and y == 0
    assert first_pixels(x) == FRAME_COLORS[:3]
    assert first_pixels(ds[1][0]) == [(30,) * 3, (10,) * 3, (20,) * 3]


def test_short_clip_policies(tmp_path):
    gif(tmp_path / "long.gif", FRAME_COLORS)
    gif(tmp_path / "short.gif", FRAME_COLORS[:2])
    ds, msgs = collect(VideoFolderDataset, tmp_path, 3, 8)  # default "skip"
    assert [c.name for c in ds.clips] == ["long.gif"]
    assert any(str(tmp_path / "short.gif") in m and "2 frames, fewer than the 3" in m for m in msgs)
    assert msgs[-1] == "skipped 1 of 2 clips (see warnings)"
    with pytest.raises(ValueError, match=r"short\.gif: it has 2 frames, fewer than the 3"):
        VideoFolderDataset(tmp_path, 3, 8, short_clips="error")
    ds, msgs = collect(VideoFolderDataset, tmp_path, 5, 8, short_clips="loop")
    assert len(ds) == 2 and msgs == []
    assert first_pixels(ds[1][0]) == [FRAME_COLORS[i] for i in (0, 1, 0, 1, 0)]
    assert first_pixels(ds[0][0]) == [FRAME_COLORS[i] for i in (0, 1, 2, 3, 0)]


def test_video_class_folders_and_unreadable_clips(tmp_path):
    gif(tmp_path / "run" / "1.gif", FRAME_COLORS)
    gif(tmp_path / "jump" / "1.gif", FRAME_COLORS)
    truncate(gif(tmp_path / "src.gif", FRAME_COLORS, size=(64, 64)), tmp_path / "jump" / "2.gif")
    (tmp_path / "src.gif").unlink()
    (tmp_path / "jump" / "3.gif").write_bytes(b"")
    (tmp_path / "run" / "2.mp4").write_bytes(b"not a video")
    ds, msgs = collect(VideoFolderDataset, tmp_path, 2, 8, channels=1)
    assert ds.classes == ["jump", "run"] and [ds[i][1] for i in range(len(ds))] == [0, 1]
    assert ds[0][0].shape == (1, 2, 8, 8)
    reasons = dict(ds.skipped)
    assert set(reasons) >= {str(tmp_path / "jump" / "3.gif"), str(tmp_path / "run" / "2.mp4")}
    assert "not an MP4 patchflow can read" in reasons[str(tmp_path / "run" / "2.mp4")] or \
        "pip install imageio" in reasons[str(tmp_path / "run" / "2.mp4")]  # without a video backend
    assert all(any(n in m for m in msgs) for n, _ in ds.skipped)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"no clips in .*none: expected files ending in \.gif"):
        VideoFolderDataset(tmp_path / "none", 2, 8)


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("dataset", "imagenet", r"data.dataset = 'imagenet' is not allowed; choose one of: 'digits', 'color-digits', 'moving-digits', 'folder'"),
    ("channels", 4, r"data.channels = 4 is not allowed; choose one of: 1, 3"),
    ("alpha_background", "grey", r"data.alpha_background = 'grey' is not allowed; choose one of: 'white', 'black'"),
    ("short_clips", "pad", r"data.short_clips = 'pad' is not allowed; choose one of: 'skip', 'error', 'loop'"),
    ("image_size", 0, r"data.image_size must be > 0"),
    ("frames", 0, r"data.frames must be > 0"),
])
def test_data_config_rejects_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**{field: value}).validate()


def test_data_config_path_required_and_checked_when_built(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path is required for data.dataset = 'folder'"):
        DataConfig(dataset="folder").validate()
    cfg = DataConfig(dataset="folder", path=str(tmp_path / "missing"))
    cfg.validate()  # existence is the data set's check (a saved run must load after its data moved)
    with pytest.raises(FileNotFoundError, match=r"data.path = '.*missing': image folder .* does not exist"):
        build_dataset(cfg)
    with pytest.raises(ValueError, match=r"data.path = .*: no images in"):
        build_dataset(DataConfig(dataset="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match="no 'val' split"):
        build_dataset(DataConfig(dataset="folder", path=str(tmp_path)), "val")


def test_run_config_checks_model_matches_data(tmp_path):
    base = ["data.dataset='folder'", f"data.path='{tmp_path}'", "model.preset='DiT-Micro/4'"]
    with pytest.raises(ConfigError, match=r"model.in_channels = 4 does not match the data: data.channels = 3"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"model.input_size = 32 does not match the data: data.image_size = 16"):
        load_config(None, base + ["model.in_channels=3", "data.image_size=16"])
    with pytest.raises(ConfigError, match=r"model.frames = 1 does not match the data: data.frames = 4"):
        load_config(None, base + ["model.in_channels=3", "data.dataset='video'", "data.frames=4"])
    with pytest.raises(ConfigError, match=r"model.frames = 2 does not match the data: .*folder.* 1 frame each"):
        load_config(None, base + ["model.in_channels=3", "model.frames=2"])
    with pytest.raises(ConfigError, match=r"data.dataset = \"captions\" .* text-conditioned"):
        load_config(None, base + ["model.in_channels=3", "data.dataset='captions'"])
    cfg = load_config(None, base + ["model.in_channels=1", "data.channels=1"])
    assert cfg.data.path == str(tmp_path)
    assert load_config(None, []).data.dataset == "digits"  # digits needs none of this


def test_build_dataset_folder_and_video(tmp_path):
    solid(tmp_path / "imgs" / "a.png", "RGBA", (8, 8), (0, 0, 0, 0))
    ds = build_dataset(DataConfig(dataset="folder", path=str(tmp_path / "imgs"), image_size=4, channels=1,
                                  alpha_background="black"))
    assert ds[0][0].shape == (1, 1, 4, 4) and torch.all(ds[0][0] == -1)
    gif(tmp_path / "vid" / "a.gif", FRAME_COLORS[:2])
    ds, _ = collect(build_dataset, DataConfig(dataset="video", path=str(tmp_path / "vid"), frames=3,
                                              image_size=4, short_clips="loop"))
    assert ds[0][0].shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"data.path = .*short_clips='error'"):
        build_dataset(DataConfig(dataset="video", path=str(tmp_path / "vid"), frames=3, short_clips="error"))


@pytest.mark.parametrize("dataset", ["folder", "video"])
def test_a_changed_folder_gets_another_latent_cache_and_a_named_one_is_refused(tmp_path, dataset):
    import os

    from patchflow.data.latent_cache import CacheError, check_cache, data_identity, default_cache_dir

    root = tmp_path / "data"
    make = (lambda p, c: solid(p.with_suffix(".png"), "RGB", (8, 8), c)) if dataset == "folder" else \
        (lambda p, c: gif(p.with_suffix(".gif"), [c, c]))
    make(root / "a", (255, 0, 0))
    cfg = DataConfig(dataset=dataset, path=str(root), image_size=4, frames=2)
    codec = {"kind": "identity"}
    first, dirs = data_identity(cfg), {default_cache_dir(cfg, codec)}
    assert data_identity(cfg) == first  # nothing changed: the same cache
    make(root / "b", (0, 255, 0))  # a new file
    dirs.add(default_cache_dir(cfg, codec))
    os.utime(next(root.glob("a.*")), ns=(1, 1))  # a replaced file: other time stamps
    dirs.add(default_cache_dir(cfg, codec))
    assert len(dirs) == 3
    named = tmp_path / "named"
    named.mkdir()
    (named / "cache.json").write_text(json.dumps({"format": "patchflow-latent-cache", "format_version": 1,
                                                  "codec": codec, "data": first}))
    with pytest.raises(CacheError, match=r"is stale: the files under data.path = .* changed since the cache was built"):
        check_cache(named, cfg, codec)


# ---- end to end ----------------------------------------------------------------------------------
def mixed_folder(root):
    """20 files in 2 class folders: 17 readable images in 10 kinds of mode/format, 3 corrupt."""
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        d = root / cls
        noise_rgb(d / "rgb.png", size=(40, 30), seed=int(rng.integers(99)))
        solid(d / "grey.png", "L", (36, 36), 90)
        solid(d / "alpha.png", "RGBA", (32, 40), (10, 200, 30, 100))
        solid(d / "la.png", "LA", (33, 33), (70, 128))
        solid(d / "cmyk.jpg", "CMYK", (40, 40), (0, 255, 255, 0))
        Image.fromarray((rng.integers(0, 65536, (34, 34))).astype(np.uint16)).save(d / "deep.png")
        p = Image.new("P", (32, 32), 0)
        p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        p.paste(1, (0, 0, 16, 32))
        p.save(d / "palette.gif", transparency=0)
    solid(root / "dogs" / "bits.bmp", "1", (32, 32), 1)
    solid(root / "dogs" / "rgba.webp", "RGBA", (32, 32), (1, 2, 3, 50), lossless=True)
    noise_rgb(root / "cats" / "rgb.jpg", size=(30, 50), seed=3, quality=85)
    truncate(noise_rgb(root / "src.png", size=(64, 64)), root / "cats" / "cut.png")
    (root / "src.png").unlink()
    (root / "dogs" / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "dogs" / "zero.webp").write_bytes(b"")
    return root


def test_training_on_a_mixed_folder_with_corrupt_files(tmp_path):
    from patchflow.train.run import train

    folder = mixed_folder(tmp_path / "data")
    assert len(list(folder.rglob("*.*"))) == 20
    cfg = load_config(None, ["data.dataset='folder'", f"data.path='{folder}'", "model.preset='DiT-Micro/4'",
                             "model.in_channels=3", "model.input_size=32", "model.num_classes=2",
                             "train.batch_size=4", "train.steps=5", "train.sample_every=0", "train.log_every=1",
                             "train.checkpoint_every=5", "train.device='cpu'", "train.lr=1e-3",
                             "train.num_threads=1"])  # one thread: 3 s instead of 30 on a busy 2-core machine
    threads = torch.get_num_threads()
    try:
        _, msgs = collect(train, cfg, tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(threads)  # the trainer sets it process-wide
    assert msgs[-1] == "skipped 3 of 20 images (see warnings)"
    for bad in ("cut.png", "junk.jpg", "zero.webp"):
        assert sum(bad in m for m in msgs) == 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in log)
    # the batches the run saw are a pure function of the index: the same folder gives the same first batch
    ds, _ = collect(build_dataset, cfg.data)
    b0 = ResumableBatchSampler(len(ds), 4, seed=cfg.train.seed).batch(0)
    ds2, _ = collect(build_dataset, cfg.data)
    assert torch.equal(torch.stack([ds[i][0] for i in b0]), torch.stack([ds2[i][0] for i in b0]))


def test_too_few_classes_for_the_class_folders_stop_before_any_work(tmp_path, capsys):
    from patchflow.cli import main

    for c in ("ant", "bee", "cat"):
        solid(tmp_path / "data" / c / "a.png", "RGB", (8, 8), (9, 9, 9))
    argv = ["train", "digits", "--out", str(tmp_path / "run"), "--set", "data.dataset=\"folder\"",
            "--set", f"data.path=\"{tmp_path / 'data'}\"", "--set", "data.image_size=32", "--set", "data.channels=1",
            "--set", "model.num_classes=2", "--set", "train.steps=1"]
    assert main(argv) == 2
    assert "has 3 class folders (ant, bee, cat) but model.num_classes = 2; set model.num_classes = 3" in \
        capsys.readouterr().err
    assert not (tmp_path / "run" / "config.toml").exists()


def test_a_class_dit_on_clips_samples_whole_clips(tmp_path):
    from patchflow.cli import main
    from patchflow.clip_files import read_clip
    from patchflow.pipeline import Pipeline

    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for i in range(3):
            gif(tmp_path / "clips" / c / f"{i}.gif", [colour, (0, 0, 0), colour], size=(16, 16))
    run = tmp_path / "run"
    sets = ["model.preset=\"DiT-Micro/4\"", "model.input_size=16", "model.in_channels=3", "model.frames=2",
            "model.num_classes=2", "data.dataset=\"video\"", f"data.path=\"{tmp_path / 'clips'}\"",
            "data.image_size=16", "data.channels=3", "data.frames=2", "train.steps=2", "train.batch_size=4",
            "train.sample_every=0", "train.num_threads=1", "sample.steps=2", 'repa.encoder=""']
    assert main(["train", "digits", "--out", str(run), "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    clips = Pipeline.load(run, device="cpu")(labels=[0, 1], seed=3)
    assert clips.shape == (2, 2, 16, 16, 3) and clips.dtype == np.uint8
    assert main(["sample", str(run), "--label", "1", "--n", "2", "--seed", "3", "--out", str(tmp_path / "x.npz"),
                 "--quiet"]) == 0
    saved = np.load(tmp_path / "x.npz")
    assert saved["videos"].shape == (2, 2, 16, 16, 3) and saved["labels"].tolist() == [1, 1]
    assert main(["sample", str(run), "--label", "1", "--n", "1", "--seed", "3", "--out", str(tmp_path / "x.gif"),
                 "--quiet"]) == 0
    assert read_clip(tmp_path / "x.gif").shape == (2, 16, 16, 3)
    assert np.array_equal(saved["videos"][0], Pipeline.load(run, device="cpu")(labels=[1], seed=3)[0])
