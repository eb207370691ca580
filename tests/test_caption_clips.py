"""Captions files that name clips: `{"video": "clips/a.gif", "caption": "..."}` lines beside image lines.

The data set (values, shapes, mixed images and clips, bad lines, short clips), the config and trainer checks, and
a tiny text-to-video run trained on captioned GIFs through the CLI and sampled to an .npz. Every file is written
by the test into tmp_path; one thread.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchflow.clip_files import write_clip
from patchflow.config import ConfigError, DataConfig, load_config
from patchflow.data import WithCaptions, build_dataset, captions_of, check_dense_frames, item_frames, item_text
from patchflow.data.buckets import CutClips
from patchflow.data.captions import ImageCaptionDataset
from patchflow.data.skipping import BadDataWarning

from run_helpers import cli, read_log

SIZE = 8
PALETTE = np.random.default_rng(0).integers(0, 256, (12, 3), dtype=np.uint8)  # <= 255 colours: GIFs are exact


def frames(seed: int, t: int, size: int = SIZE) -> np.ndarray:
    """uint8 (t, size, size, 3) random frames drawn from PALETTE."""
    return PALETTE[np.random.default_rng(seed).integers(0, len(PALETTE), (t, size, size))]


def units(a: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (3, T, H, W) in [-1, 1], the data sets' mapping."""
    return torch.from_numpy(a.astype(np.float32)).permute(3, 0, 1, 2).div(127.5).sub(1.0)


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def collect(fn, *args, **kwargs):
    """(fn's result, [messages of the BadDataWarnings it raised])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, BadDataWarning)]


@pytest.fixture
def media(tmp_path):
    """A 5-frame GIF, a 3-frame folder of PNGs (named 1, 2, 10: natural order), a 2-frame GIF and a PNG image."""
    clips = {"clips/five.gif": frames(1, 5), "clips/short.gif": frames(2, 2)}
    for name, a in clips.items():
        write_clip(tmp_path / name, a)
    folder = frames(3, 3)
    (tmp_path / "clips" / "folder").mkdir()
    for k, name in enumerate(["1.png", "2.png", "10.png"]):
        Image.fromarray(folder[k]).save(tmp_path / "clips" / "folder" / name)
    clips["clips/folder"] = folder
    image = frames(4, 1)[0]
    Image.fromarray(image).save(tmp_path / "still.png")
    clips["still.png"] = image[None]
    return clips


# ---- the data set ----------------------------------------------------------------------------------------
def test_clip_lines_give_their_first_frames_and_images_stay_one_frame(tmp_path, media):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"video": "clips/five.gif", "caption": "five frames"},
        {"image": "still.png", "caption": "a still"},
        {"video": str(tmp_path / "clips" / "folder"), "caption": "a folder of frames"},  # absolute path
    ])
    ds = build_dataset(DataConfig(dataset="captions", path=str(path), frames=3, image_size=SIZE), text=True)
    assert isinstance(ds, ImageCaptionDataset) and len(ds) == 3 and ds.skipped == []
    assert item_frames(ds) == [3, 1, 3] and [e.kind for e in ds.items] == ["video", "image", "video"]
    assert [item_text(ds, i) for i in range(3)] == ["five frames", "a still", "a folder of frames"]
    for i, source in enumerate(["clips/five.gif", "still.png", "clips/folder"]):
        x, caption = ds[i]
        want = units(media[source][:3])
        assert x.shape == want.shape and x.dtype == torch.float32 and caption == item_text(ds, i)
        assert torch.equal(x, want), source  # exact: GIF palettes and PNGs are lossless, no resizing at 8x8
    # the default frames=1 (and a text-to-image run with data.frames = 1) keeps a clip's first frame
    first = ImageCaptionDataset(path, SIZE)
    assert item_frames(first) == [1, 1, 1] and torch.equal(first[0][0], units(media["clips/five.gif"][:1]))
    # captions come without loading media, also through a bucketed run's cut and a latent cache's WithCaptions
    assert captions_of(CutClips(ds, [1, 1, 1])) == ["five frames", "a still", "a folder of frames"]
    assert item_frames(WithCaptions([(None, None)] * 3, ds)) == [3, 1, 3]
    batch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 2]), batch_size=2)))
    assert batch[0].shape == (2, 3, 3, SIZE, SIZE) and list(batch[1]) == ["five frames", "a folder of frames"]


def test_a_clip_is_resized_and_converted_like_a_video_folders(tmp_path, media):
    from patchflow.data.video import VideoFolderDataset

    path = write_jsonl(tmp_path / "c.jsonl", [{"video": "clips/five.gif", "caption": "x"}])
    ours = ImageCaptionDataset(path, 4, channels=1, frames=4)
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "five.gif").write_bytes((tmp_path / "clips" / "five.gif").read_bytes())
    theirs = VideoFolderDataset(tmp_path / "v", 4, 4, channels=1)
    assert ours[0][0].shape == (1, 4, 4, 4) and torch.equal(ours[0][0], theirs[0][0])


def test_a_clip_gone_bad_after_the_scan_is_replaced_by_a_clip_not_an_image(tmp_path, media):
    path = write_jsonl(tmp_path / "c.jsonl", [{"video": "clips/five.gif", "caption": "five"},
                                              {"image": "still.png", "caption": "still"},
                                              {"video": "clips/folder", "caption": "folder"}])
    ds = ImageCaptionDataset(path, SIZE, frames=3)
    (tmp_path / "clips" / "five.gif").write_bytes(b"GIF89a gone")
    (x, caption), msgs = collect(ds.__getitem__, 0)
    assert caption == "folder" and torch.equal(x, units(media["clips/folder"]))
    assert any("five.gif became unreadable after the scan" in m for m in msgs)
    assert ds[1][1] == "still" and ds[1][0].shape == (3, 1, SIZE, SIZE)


def test_bad_lines_are_skipped_naming_the_line_or_raise_when_strict(tmp_path, media):
    (tmp_path / "bad.gif").write_bytes(b"GIF89a this is not a gif")
    (tmp_path / "bad.mp4").write_bytes(b"not an mp4 either")
    (tmp_path / "empty").mkdir()
    lines = [{"video": "clips/five.gif", "caption": "ok"},                          # 1 ok
             {"image": "still.png", "video": "clips/five.gif", "caption": "x"},      # 2 both
             {"caption": "neither"},                                                 # 3 neither
             {"video": "missing.gif", "caption": "x"},                               # 4 no such file
             {"video": "bad.gif", "caption": "x"},                                   # 5 unreadable GIF
             {"video": "bad.mp4", "caption": "x"},                                   # 6 unreadable video
             {"video": "clips/five.gif", "caption": " "},                            # 7 empty caption
             {"video": "still.png", "caption": "x"},                                 # 8 a still named as a clip
             {"video": "empty", "caption": "x"},                                     # 9 folder without frames
             {"video": "", "caption": "x"},                                          # 10 empty path
             {"image": "still.png", "caption": "an image"}]                          # 11 ok
    path = write_jsonl(tmp_path / "captions.jsonl", lines)
    ds, msgs = collect(ImageCaptionDataset, path, SIZE, frames=3)
    assert [e.line for e in ds.items] == [1, 11] and item_frames(ds) == [3, 1]
    bad = [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [name for name, _ in ds.skipped] == [f"line {n} of {path}" for n in bad]
    for n in bad:
        assert sum(f"skipping line {n} of {path}:" in m for m in msgs) == 1, n
    assert msgs[-1] == "skipped 9 of 11 caption entries (see warnings)"
    why = {int(name.split()[1]): reason for name, reason in ds.skipped}
    assert "both 'image' and 'video'" in why[2] and "missing 'image' or 'video'" in why[3]
    assert "does not exist" in why[4] and "cannot be read" in why[5] and "bad.gif" in why[5]
    assert "cannot be read" in why[6] and "empty 'caption'" in why[7]
    assert "is not a clip" in why[8] and "'image' line" in why[8] and "is not a clip" in why[9]
    assert "missing or empty 'video'" in why[10]
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: both 'image' and 'video' given"):
        ImageCaptionDataset(path, SIZE, frames=3, strict=True)
    # through build_dataset the message also names data.path
    with pytest.raises(ValueError, match=r"data.path = .*no usable image-caption entries: 1 non-blank lines"):
        collect(build_dataset, DataConfig(dataset="captions", path=str(write_jsonl(tmp_path / "b.jsonl", lines[1:2]))))


def test_short_clips_follow_data_short_clips(tmp_path, media):
    path = write_jsonl(tmp_path / "c.jsonl", [{"video": "clips/five.gif", "caption": "long"},
                                              {"video": "clips/short.gif", "caption": "short"}])
    cfg = DataConfig(dataset="captions", path=str(path), frames=3, image_size=SIZE)
    ds, msgs = collect(build_dataset, cfg)  # "skip", the default
    assert [item_text(ds, i) for i in range(len(ds))] == ["long"]
    assert any(f"line 2 of {path}" in m and "2 frames, fewer than the 3 asked for" in m and "short_clips='skip'" in m
               for m in msgs)
    assert collect(ImageCaptionDataset, path, SIZE, frames=3, strict=True)[0].skipped  # a policy, not a bad line
    with pytest.raises(ValueError, match=r"c\.jsonl:2: clip .*short\.gif.*2 frames, fewer than the 3.*"
                                         r"short_clips='error'"):
        build_dataset(DataConfig(dataset="captions", path=str(path), frames=3, short_clips="error"))
    loop = build_dataset(DataConfig(dataset="captions", path=str(path), frames=5, image_size=SIZE,
                                    short_clips="loop"))
    short = media["clips/short.gif"]
    assert item_frames(loop) == [5, 5] and torch.equal(loop[1][0], units(short[[0, 1, 0, 1, 0]]))


# ---- config and trainer checks ------------------------------------------------------------------------------
VIDEO = ["model.arch=\"video\"", "model.input_size=8", "model.frames=2", "model.in_channels=3", "model.patch_size=4",
         "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.text_dim=384", "model.pooled_dim=384",
         "data.dataset=\"captions\"", "data.image_size=8", "data.frames=2", "train.num_threads=1"]


def test_a_video_model_on_captions_must_take_data_frames():
    load_config(None, VIDEO + ["data.path=\"c.jsonl\""])
    load_config(None, VIDEO + ["data.path=\"c.jsonl\"", "model.frames=1"])  # images only (clips cut to 1 frame)
    with pytest.raises(ConfigError, match=r"model.frames = 2 does not match the data: data.frames = 4 \(the frames "
                                          r"of the captions file's clips"):
        load_config(None, VIDEO + ["data.path=\"c.jsonl\"", "data.frames=4"])
    with pytest.raises(ConfigError, match=r"\"video\" for clips"):
        load_config(None, ["data.dataset=\"captions\"", "data.path=\"c.jsonl\""])


def test_items_of_other_frames_without_buckets_are_refused_naming_the_lines(tmp_path, media):
    path = write_jsonl(tmp_path / "c.jsonl", [{"video": "clips/five.gif", "caption": "a clip"},
                                              {"image": "still.png", "caption": "an image"},
                                              {"image": "still.png", "caption": "another image"}])
    ds = ImageCaptionDataset(path, SIZE, frames=2)
    check_dense_frames(torch.utils.data.Subset(ds, [0]), 2)  # not a captions file itself: nothing to check
    with pytest.raises(ValueError, match=r"2 lines of it \(e.g. line 2\) name images, one-frame items, but "
                                         r"model.frames = 2.*data.buckets = \[\[1, 8, 8, 16\], \[2, 8, 8, 4\]\]"):
        check_dense_frames(ds, 2)
    with pytest.raises(ValueError, match=r"1 line of it \(e.g. line 1\) name clips, read as data.frames = 2 frames, "
                                         r"but model.frames = 1.*data.frames = 1"):
        check_dense_frames(ds, 1)  # a text-to-image model
    check_dense_frames(ImageCaptionDataset(path, SIZE, frames=1), 1)  # first frames only: fine


# ---- a tiny text-to-video run on captioned GIFs --------------------------------------------------------------
@pytest.fixture
def gif_captions(tmp_path):
    """8 captioned 3-frame GIFs (a square moving left or right) and 4 captioned images, 8x8 RGB, one file."""
    lines = []
    for i in range(8):
        colour, direction = PALETTE[i % 4 + 1], ("left", "right")[i % 2]
        a = np.zeros((3, SIZE, SIZE, 3), np.uint8)
        for t in range(3):
            x = 3 + (t if direction == "right" else -t)
            a[t, 2:5, x:x + 3] = colour
        write_clip(tmp_path / "clips" / f"{i}.gif", a)
        lines.append({"video": f"clips/{i}.gif", "caption": f"square {i % 4} moving {direction}"})
    for i in range(4):
        Image.fromarray(frames(10 + i, 1)[0]).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "caption": f"noise {i}"})
    return write_jsonl(tmp_path / "captions.jsonl", lines)


def test_text_to_video_run_on_captioned_gifs_trains_and_samples(gif_captions, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    config = tmp_path / "t2v.toml"
    sets = VIDEO + [f"data.path=\"{gif_captions}\"", "data.buckets=[[1, 8, 8, 4], [2, 8, 8, 4]]",
                    "train.batch_size=4", "train.steps=3", "train.lr=1e-3", "train.log_every=1",
                    "train.sample_every=0", "train.checkpoint_every=3", "sample.steps=2", "sample.n=2"]
    config.write_text(load_config(None, sets).to_toml())
    try:
        code, said = cli(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"], capsys)
        assert code == 0, said
        log = read_log(tmp_path / "run")
        assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
        code, said = cli(["sample", str(tmp_path / "run"), "--prompt", "square 1 moving right", "--frames", "2",
                          "--n", "2", "--out", str(tmp_path / "x.npz"), "--quiet"], capsys)
        assert code == 0, said
        with np.load(tmp_path / "x.npz") as f:
            assert f["videos"].shape == (2, 2, SIZE, SIZE, 3) and f["videos"].dtype == np.uint8
        # without buckets the images cannot share batches with the 2-frame clips: exit 2, naming the lines
        code, said = cli(["train", str(config), "--out", str(tmp_path / "dense"), "--quiet", "--set",
                          "data.buckets=[]"], capsys)
        assert code == 2 and "4 lines of it (e.g. line 9) name images" in said and "data.buckets" in said, said
    finally:
        torch.set_num_threads(n)
