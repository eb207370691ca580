"""patchflow.clip_files: clips and stills in and out (GIF, MP4, npz, images), with clear errors."""
import re
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from patchflow import clip_files
from patchflow.clip_files import fit_frame, read_clip, read_image, write_clip, write_clips_npz
from patchflow.media import write as clip_write  # where write_clip looks up _write_gif

INSTALL = "pip install imageio imageio-ffmpeg"


@pytest.fixture(scope="module")
def clip():
    """A real moving-digits clip: uint8 (9, 32, 32, 3), flat colours plus anti-aliased stroke edges."""
    from patchflow.data.moving_digits import MovingDigitsDataset

    return MovingDigitsDataset("val").render(0)[0]


def mean_abs(a, b):
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def no_video_backend(monkeypatch):
    for name in ("imageio", "imageio.v3", "imageio_ffmpeg", "av"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------ GIF


def test_gif_round_trip_is_exact_for_world_frames(tmp_path, clip):
    assert clip.shape == (9, 32, 32, 3) and len(np.unique(clip.reshape(-1, 3), axis=0)) > 2
    path = write_clip(tmp_path / "a.gif", clip, fps=8)
    back = read_clip(path)
    assert back.dtype == np.uint8 and back.shape == clip.shape
    assert np.array_equal(back, clip)  # palette quantisation gives back the exact colours
    with Image.open(path) as im:
        assert im.n_frames == 9 and im.info["loop"] == 0  # loops forever
        assert abs(im.info["duration"] - 1000 / 8) <= 10  # GIF delays are centiseconds: 125 ms -> 120 ms
    assert leftovers(tmp_path) == []


def test_gif_keeps_repeated_frames_and_per_frame_colours(tmp_path, clip):
    rep = np.stack([clip[0], clip[0], clip[0], clip[1], clip[1], clip[2]])
    assert np.array_equal(read_clip(write_clip(tmp_path / "rep.gif", rep)), rep)  # PIL alone would merge them
    still = np.repeat(clip[:1], 4, axis=0)
    assert np.array_equal(read_clip(write_clip(tmp_path / "still.gif", still)), still)
    # 200 colours per frame, 400 in the clip: each frame gets its own exact palette
    rng = np.random.default_rng(0)
    frames = np.empty((2, 20, 10, 3), np.uint8)
    for t in range(2):
        colours = rng.choice(2 ** 24, 200, replace=False)
        rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.uint8)
        frames[t] = rgb.reshape(20, 10, 3)
    assert np.array_equal(read_clip(write_clip(tmp_path / "many.gif", frames)), frames)


def test_gif_quantises_frames_with_many_colours_without_dithering(tmp_path):
    y, x = np.mgrid[0:32, 0:32]
    grad = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)  # 1024 colours
    frames = np.stack([grad, grad[::-1]])
    back = read_clip(write_clip(tmp_path / "grad.gif", frames))
    assert back.shape == frames.shape and mean_abs(back, frames) < 4


def test_grey_frames_become_rgb(tmp_path, clip):
    grey = clip[..., 1]
    for frames in (grey, grey[..., None]):
        back = read_clip(write_clip(tmp_path / "g.gif", frames))
        assert back.shape == (*grey.shape, 3) and np.array_equal(back, np.repeat(grey[..., None], 3, -1))


# ------------------------------------------------------------------------------------------------ MP4


def test_mp4_round_trip_is_close_and_keeps_the_size(tmp_path, clip):
    back = read_clip(write_clip(tmp_path / "a.mp4", clip, fps=8))
    assert back.shape == clip.shape
    err = mean_abs(back, clip)
    print(f"mp4 yuv444p crf {clip_files.CRF}: mean abs error {err:.2f}/255")
    assert err < 8  # measured 0.79/255 (yuv420p: 8.1/255, colour at half resolution)
    for h, w in ((30, 30), (31, 29)):  # not multiples of 16 (no macro-block rescale); odd sizes in yuv444p
        part = np.ascontiguousarray(clip[:, :h, :w])
        back = read_clip(write_clip(tmp_path / f"{h}x{w}.mp4", part))
        assert back.shape == part.shape and mean_abs(back, part) < 8
    part = np.ascontiguousarray(clip[:3, :30, :30])
    back = read_clip(write_clip(tmp_path / "420.mp4", part, pixel_format="yuv420p"))
    assert back.shape == part.shape and mean_abs(back, part) < 16
    with pytest.raises(ValueError, match="even height and width.*31x29"):
        write_clip(tmp_path / "odd.mp4", clip[:, :31, :29], pixel_format="yuv420p")
    assert read_image(tmp_path / "a.mp4").shape == (32, 32, 3)
    assert leftovers(tmp_path) == []


def test_mp4_through_pyav_when_imageio_is_missing(tmp_path, clip, monkeypatch):
    pytest.importorskip("av")
    for name in ("imageio", "imageio.v3", "imageio_ffmpeg"):
        monkeypatch.setitem(sys.modules, name, None)
    part = np.ascontiguousarray(clip[:4, :31])
    back = read_clip(write_clip(tmp_path / "av.mp4", part))
    assert back.shape == part.shape and mean_abs(back, part) < 8


def test_missing_video_backend_says_what_to_install(tmp_path, clip, monkeypatch):
    (tmp_path / "old.mp4").write_bytes(b"anything")
    no_video_backend(monkeypatch)
    with pytest.raises(ImportError, match=re.escape(INSTALL) + r".*patchflow\[video\]"):
        write_clip(tmp_path / "a.mp4", clip)
    with pytest.raises(ImportError, match=re.escape(INSTALL)):
        read_clip(tmp_path / "old.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.mp4"]  # nothing half-written
    write_clip(tmp_path / "a.gif", clip)  # GIF and npz need no video backend
    write_clip(tmp_path / "a.npz", clip)


# ------------------------------------------------------------------------------------------------ npz


def test_npz_round_trips_are_exact(tmp_path, clip):
    path = write_clip(tmp_path / "one.npz", clip)
    with np.load(path) as f:
        assert f.files == ["videos"] and f["videos"].dtype == np.uint8 and f["videos"].shape == (1, *clip.shape)
    assert np.array_equal(read_clip(path), clip)
    videos = np.stack([clip, clip[::-1], 255 - clip])
    path = write_clips_npz(tmp_path / "many.npz", videos, prompts=["a", "b c", "d"], seeds=np.arange(3))
    with np.load(path) as f:
        assert f["prompts"].tolist() == ["a", "b c", "d"] and f["seeds"].tolist() == [0, 1, 2]
        assert np.array_equal(f["videos"], videos)
    for i in range(3):
        assert np.array_equal(read_clip(path, index=i), videos[i])
    assert np.array_equal(read_image(path, index=2), videos[2, 0])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*index 3 is out of range.*3 videos"):
        read_clip(path, index=3)
    with pytest.raises(ValueError, match="prompts must be 3 strings"):
        write_clips_npz(tmp_path / "bad.npz", videos, prompts=["a", "b"])
    with pytest.raises(ValueError, match=r"uint8 \(N, T, H, W, 3\)"):
        write_clips_npz(tmp_path / "bad.npz", clip)
    # images (N, H, W, C) read as one-frame clips; grey widened to RGB
    images = clip[:2, ..., :1]
    np.savez(tmp_path / "images.npz", images=images, labels=np.arange(2))
    back = read_clip(tmp_path / "images.npz", index=1)
    assert back.shape == (1, 32, 32, 3) and np.array_equal(back[0], np.repeat(images[1], 3, -1))


def test_npz_without_videos_or_images_names_its_keys(tmp_path):
    np.savez(tmp_path / "k.npz", samples=np.zeros((1, 2, 4, 4, 3), np.uint8), prompts=np.array(["x"]))
    with pytest.raises(ValueError, match=r"k\.npz.*no 'videos'.*'images'.*its keys: samples, prompts"):
        read_clip(tmp_path / "k.npz")
    np.savez(tmp_path / "f.npz", videos=np.zeros((1, 2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"f\.npz: 'videos' must be uint8 \(N, T, H, W, 3\); it is float32"):
        read_clip(tmp_path / "f.npz")
    np.savez(tmp_path / "z.npz", videos=np.zeros((1, 0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"z\.npz has no frames"):
        read_clip(tmp_path / "z.npz")


# ------------------------------------------------------------------------------------------------ stills


def test_still_images_read_as_rgb(tmp_path, clip):
    Image.fromarray(clip[3]).save(tmp_path / "s.png")
    assert np.array_equal(read_image(tmp_path / "s.png"), clip[3])
    assert np.array_equal(read_clip(tmp_path / "s.png"), clip[3:4])  # a one-frame clip
    Image.fromarray(clip[3, ..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(read_image(tmp_path / "grey.png"), np.repeat(clip[3, ..., :1], 3, -1))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 0)  # fully transparent: black, whatever is stored under it
    rgba[1, :] = (200, 100, 50, 51)  # 20% over black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").tolist() == [[[200, 100, 50], [0, 0, 0]], [[40, 20, 10]] * 2]
    write_clip(tmp_path / "a.gif", clip)
    assert np.array_equal(read_image(tmp_path / "a.gif"), clip[0])  # a GIF's first frame


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ".png", ".npz"])
def test_corrupt_files_are_value_errors_naming_the_file(tmp_path, clip, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".png":
        Image.fromarray(clip[0]).save(good)
    else:
        write_clip(good, clip)
    data = good.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"not a clip at all"), ("empty", b"")):
        bad = tmp_path / f"{name}{suffix}"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(bad)) + " is not an? .*patchflow can read: ") as e:
            read_clip(bad)
        assert len(str(e.value)) < 700 and "\n" not in str(e.value)


def test_missing_files_folders_and_unknown_suffixes(tmp_path, clip):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.gif"))):
        read_clip(tmp_path / "nope.gif")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.png"))):
        read_image(tmp_path / "nope.png")
    (tmp_path / "dir.gif").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        read_clip(tmp_path / "dir.gif")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown suffix '\.txt'.*\.gif.*\.mp4.*\.npz.*\.png"):
        read_clip(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"unknown suffix '\.avi'; clips are written as \.gif, \.mp4, \.npz"):
        write_clip(tmp_path / "a.avi", clip)
    with pytest.raises(ValueError, match="index picks a clip in an .npz"):
        read_clip(write_clip(tmp_path / "a.gif", clip), index=1)


def test_bad_frames_and_fps_are_refused(tmp_path, clip):
    with pytest.raises(ValueError, match=r"uint8 \(T, H, W, 3\).*float32.*127\.5"):
        write_clip(tmp_path / "a.gif", clip.astype(np.float32))
    with pytest.raises(ValueError, match=r"got shape \(9, 32, 32, 2\)"):
        write_clip(tmp_path / "a.gif", clip[..., :2])
    with pytest.raises(ValueError, match="at least one frame"):
        write_clip(tmp_path / "a.gif", clip[:0])
    with pytest.raises(ValueError, match="fps must be a number > 0"):
        write_clip(tmp_path / "a.gif", clip, fps=0)
    assert list(tmp_path.iterdir()) == []


def test_writes_are_atomic(tmp_path, clip, monkeypatch):
    path = write_clip(tmp_path / "sub" / "a.gif", clip)  # parent folders are created
    before = path.read_bytes()

    def crash(tmp, frames, fps):
        tmp.write_bytes(b"half a GIF")
        raise OSError("disk full")

    monkeypatch.setattr(clip_write, "_write_gif", crash)
    with pytest.raises(OSError, match="disk full"):
        write_clip(path, clip[::-1])
    assert path.read_bytes() == before and leftovers(path.parent) == []


# ------------------------------------------------------------------------------------------------ fit_frame


def test_fit_frame_passes_the_right_size_and_resizes_others_with_a_warning():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(fit_frame(img, (32, 32)), img)
        assert np.array_equal(fit_frame(img, 32), img)
    # 64x96: centre-cropped to 64x64 (the side bands go), then Lanczos to 32x32
    big = np.zeros((64, 96, 3), np.uint8)
    big[:, :16] = big[:, -16:] = (255, 0, 0)
    big[:, 16:-16] = (10, 200, 30)
    with pytest.warns(UserWarning, match=r"--first-frame: resized from 64x96 to 32x32.*centre-cropped to 64x64"):
        out = fit_frame(big, (32, 32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 1  # no red from the cropped bands
    with pytest.warns(UserWarning, match=r"--extend: resized from 16x16 to 32x48"):
        assert fit_frame(big[:16, 16:32], (32, 48), name="--extend").shape == (32, 48, 3)


def test_fit_frame_converts_grey_and_rgba_with_a_warning():
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    for g in (grey, grey[..., None]):
        with pytest.warns(UserWarning, match="converted from grey to RGB"):
            out = fit_frame(g, (4, 4))
        assert out.shape == (4, 4, 3) and np.array_equal(out, np.repeat(grey[..., None], 3, -1))
    rgba = np.full((4, 4, 4), 200, np.uint8)
    rgba[..., 3] = 0
    rgba[0, 0, 3] = 255
    with pytest.warns(UserWarning, match="RGBA.*over black"):
        out = fit_frame(rgba, (4, 4))
    assert out[0, 0].tolist() == [200, 200, 200] and out[1:].max() == 0


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8), np.float32),
                                 np.zeros((8, 8, 3), np.float64), np.zeros((1, 8, 8, 3), np.uint8),
                                 np.zeros((8,), np.uint8)])
def test_fit_frame_refuses_other_shapes_and_dtypes(bad):
    with pytest.raises(ValueError, match=r"--first-frame must be a uint8 \(H, W, 3\) RGB image"):
        fit_frame(bad, (8, 8))
