"""Text-to-video runs end to end: the trainer (buckets, packing, given frames), the CLI's clip flags and files, the
Python pipeline, exact resume after kill -9. A tiny VideoDiT on 4-frame moving-digits clips in pixels (patch 8),
the real MiniLM encoder (no embedding cache), one thread."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from patchflow.clip_files import read_clip, write_clip
from patchflow.config import ConfigError, load_config
from patchflow.data.moving_digits import MovingDigitsDataset
from patchflow.pipeline import Pipeline
from patchflow.train.run import train

from run_helpers import cli, kill_9_then_resume, read_log

STEPS = 12
PROMPT = "a red 7 moving left on a black background"


def video_sets(*extra):
    return ["model.arch=\"video\"", "model.input_size=32", "model.frames=4", "model.in_channels=3",
            "model.patch_size=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.text_dim=384",
            "model.pooled_dim=384", "data.dataset=\"moving-digits\"", "data.frames=4", "text.cache=\"off\"",
            "flow.context_prob=0.5", "train.batch_size=8", f"train.steps={STEPS}", "train.lr=1e-3",
            "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=4", "train.num_threads=1",
            "train.ema_decay=0.9", "sample.steps=3", "sample.n=2", *extra]


PACKED = ("data.buckets=[[1, 32, 32, 8], [2, 32, 32, 4], [4, 32, 32, 4, 2]]", "train.pack_tokens=96")
BUCKETED = ("data.buckets=[[1, 32, 32, 8], [2, 32, 32, 4, 2], [4, 32, 32, 4]]",)


@pytest.fixture(autouse=True)
def _cache(session_cache, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(session_cache))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _train(tmp_path_factory, cache, name, *sets):
    os.environ["PATCHFLOW_CACHE"] = str(cache)
    out = tmp_path_factory.mktemp(name) / "run"
    train(load_config(None, video_sets(*sets)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def video_run(tmp_path_factory, session_cache):
    return _train(tmp_path_factory, session_cache, "t2v")


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, session_cache):
    return _train(tmp_path_factory, session_cache, "t2v-packed", *PACKED)


@pytest.fixture(scope="module")
def bucketed_run(tmp_path_factory, session_cache):
    return _train(tmp_path_factory, session_cache, "t2v-bucketed", *BUCKETED)


def still(tmp_path, size=32, mode="RGB") -> tuple[Path, np.ndarray]:
    frame = MovingDigitsDataset("val", frames=1).render(0)[0][0]
    path = tmp_path / "still.png"
    Image.fromarray(frame).convert(mode).resize((size, size), Image.NEAREST).save(path)
    return path, frame


def test_a_video_run_trains_and_samples_clips(video_run):
    log = read_log(video_run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)) and all(np.isfinite(r["loss"]) for r in log)
    pipe = Pipeline.load(video_run, device="cpu")
    clips = pipe(prompt=[PROMPT, "a blue 3 moving up on a white background"], frames=4, seed=0)
    assert clips.shape == (2, 4, 32, 32, 3) and clips.dtype == np.uint8
    again = pipe(prompt=[PROMPT, "a blue 3 moving up on a white background"], frames=4, seed=0)
    assert np.array_equal(clips, again)
    assert pipe(prompt=PROMPT, n=1, frames=6, seed=0).shape == (1, 6, 32, 32, 3)  # a length never trained
    assert pipe(prompt=PROMPT, n=1, frames=2, size=(32, 48)).shape == (1, 2, 32, 48, 3)  # nor a size


def test_packed_bucketed_run_mixes_durations_and_logs_clips_per_second(packed_run):
    log = read_log(packed_run)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)) and all(np.isfinite(r["loss"]) for r in log)
    assert all(r["images_per_s"] > 0 and r["steps_per_s"] > 0 and 0 < r["mfu"] < 1 for r in log)


@pytest.mark.usefixtures("digit_classifier")  # scores digits: the session's one classifier, not a training of its own
def test_cli_writes_gif_mp4_and_npz_clips(video_run, tmp_path, capsys):
    code, said = cli(["sample", str(video_run), "--prompt", PROMPT, "--n", "1", "--frames", "4", "--out",
                      str(tmp_path / "clip.gif"), "--quiet"], capsys)
    assert code == 0, said
    assert read_clip(tmp_path / "clip.gif").shape == (4, 32, 32, 3)
    code, said = cli(["sample", str(video_run), "--prompt", PROMPT, "--n", "1", "--out", str(tmp_path / "c.mp4"),
                      "--quiet"], capsys)
    assert code == 0 and read_clip(tmp_path / "c.mp4").shape == (4, 32, 32, 3), said
    prompts = [PROMPT, "a green 0 moving down on a gray background", "a white 5 moving right on a red background"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    code, said = cli(["sample", str(video_run), "--prompts-file", str(tmp_path / "p.txt"), "--out",
                      str(tmp_path / "clips.npz"), "--quiet"], capsys)
    assert code == 0, said
    with np.load(tmp_path / "clips.npz") as f:
        assert f["videos"].shape == (3, 4, 32, 32, 3) and f["videos"].dtype == np.uint8
        assert f["prompts"].tolist() == prompts
    code, said = cli(["eval", str(tmp_path / "clips.npz")], capsys)
    assert code == 0 and "direction" in said and "3 clips" in said, said


@pytest.mark.usefixtures("digit_classifier")  # scores digits: the session's one classifier, not a training of its own
def test_eval_of_a_video_run_samples_with_the_asked_sampler_and_steps(video_run, capsys, monkeypatch):
    calls = []
    call = Pipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("sampler"), kwargs.get("steps")))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    code, said = cli(["eval", str(video_run), "--prompts", "2", "--frames", "4", "--steps", "2", "--sampler", "heun",
                      "--quiet"], capsys)
    assert code == 0 and "image-to-video from 1 real held-out first frames" in said, said
    assert calls == [("heun", 2), ("heun", 2)]  # text-to-video, then image-to-video
    calls.clear()
    code, said = cli(["eval", str(video_run), "--curve", "--prompts", "1", "--frames", "4", "--steps", "1",
                      "--sampler", "heun", "--quiet"], capsys)
    assert code == 0 and calls and set(calls) == {("heun", 1)}, said


def test_first_frame_is_kept_exactly_and_other_sizes_are_resized_with_a_warning(video_run, tmp_path, capsys):
    path, frame = still(tmp_path)
    code, said = cli(["sample", str(video_run), "--prompt", PROMPT, "--n", "2", "--first-frame", str(path),
                      "--out", str(tmp_path / "i2v.npz"), "--quiet"], capsys)
    assert code == 0, said
    with np.load(tmp_path / "i2v.npz") as f:
        clips = f["videos"]
    assert np.array_equal(clips[:, 0], np.stack([frame, frame]))  # pixels: the given frame is held exactly
    assert not np.array_equal(clips[:, 1], clips[:, 0])
    big, _ = still(tmp_path, size=64, mode="L")
    with pytest.warns(UserWarning, match="resized from 64x64 to 32x32"):
        clips = Pipeline.load(video_run, device="cpu")(prompt=PROMPT, n=1, first_frame=big)
    assert clips.shape == (1, 4, 32, 32, 3)
    with pytest.raises(ValueError, match="first_frame"):
        Pipeline.load(video_run, device="cpu")(prompt=PROMPT, n=1, first_frame=np.zeros((32, 32, 2), np.uint8))


def test_extend_continues_a_clip_and_video_to_video_redraws_it(video_run, tmp_path, capsys):
    clip = MovingDigitsDataset("val", frames=3).render(1)[0]
    write_clip(tmp_path / "given.gif", clip)
    code, said = cli(["sample", str(video_run), "--prompt", PROMPT, "--n", "1", "--extend", str(tmp_path / "given.gif"),
                      "--frames", "4", "--out", str(tmp_path / "ext.npz"), "--quiet"], capsys)
    assert code == 0, said
    with np.load(tmp_path / "ext.npz") as f:
        out = f["videos"][0]
    assert out.shape == (4, 32, 32, 3) and np.array_equal(out[:3], clip)  # 3 given frames + 1 new
    pipe = Pipeline.load(video_run, device="cpu")
    source = MovingDigitsDataset("val", frames=4).render(2)[0]
    near = pipe(prompt=PROMPT, n=1, video=source, strength=0.2, seed=0)[0].astype(float)
    far = pipe(prompt=PROMPT, n=1, video=source, strength=1.0, seed=0)[0].astype(float)
    assert np.abs(near - source).mean() < np.abs(far - source).mean() / 2


@pytest.mark.parametrize("flags,message", [
    (["--frames", "4"], "for video runs"),
    (["--out-suffix", ".gif"], "--out must end in .png"),
])
def test_video_flags_on_an_image_run_exit_2(tmp_path, capsys, flags, message):
    run = tmp_path / "img"
    run.mkdir()
    (run / "config.toml").write_text(load_config("digits").to_toml())
    out = str(tmp_path / ("x.gif" if flags[0] == "--out-suffix" else "x.png"))
    flags = [] if flags[0] == "--out-suffix" else flags
    code, said = cli(["sample", str(run), "--label", "3", "--out", out, *flags], capsys)
    assert code == 2 and message in said, said


@pytest.mark.parametrize("flags,message", [
    (["--strength", "0.5"], "--strength goes with --video-to-video"),
    (["--video-to-video", "V", "--strength", "1.5"], "--strength must be in [0, 1]"),
    (["--first-frame", "S", "--extend", "V"], "give one of --first-frame, --extend and --video-to-video"),
    (["--extend", "missing.gif"], "does not exist"),
    (["--first-frame", "BAD"], "BAD.png"),
    (["--extend", "BADGIF"], "bad.gif"),
    (["--video-to-video", "BADMP4"], "bad.mp4"),
    (["--size", "36x36"], "multiples of the patch size"),
    (["--out-suffix", ".webm"], "--out must end in .gif or .mp4"),
])
def test_bad_video_sampling_input_exits_2_with_a_message(video_run, tmp_path, capsys, flags, message):
    path, _ = still(tmp_path)
    write_clip(tmp_path / "v.gif", MovingDigitsDataset("val", frames=4).render(0)[0])
    (tmp_path / "BAD.png").write_bytes(b"not a png")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    names = {"S": str(path), "V": str(tmp_path / "v.gif"), "BAD": str(tmp_path / "BAD.png"),
             "BADGIF": str(tmp_path / "bad.gif"), "BADMP4": str(tmp_path / "bad.mp4"),
             "missing.gif": str(tmp_path / "missing.gif")}
    out = str(tmp_path / "x.gif")
    if flags[0] == "--out-suffix":
        out, flags = str(tmp_path / f"x{flags[1]}"), []
    code, said = cli(["sample", str(video_run), "--prompt", PROMPT, "--n", "1", "--out", out,
                      *[names.get(f, f) for f in flags], "--quiet"], capsys)
    assert code == 2 and message in said and "Traceback" not in said, said


def test_missing_video_writer_exits_2_saying_what_to_install(video_run, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_video(name, *args, **kwargs):
        if name.split(".")[0] in ("imageio", "imageio_ffmpeg", "av"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_video)
    code, said = cli(["sample", str(video_run), "--prompt", PROMPT, "--n", "1", "--out", str(tmp_path / "c.mp4"),
                      "--quiet"], capsys)
    assert code == 2 and "pip install" in said and "imageio" in said, said
    assert not (tmp_path / "c.mp4").exists()


@pytest.mark.parametrize("sets,message", [
    (["data.buckets=[[4, 48, 48, 4]]"], "no bucket takes"),
    (["data.buckets=[[1, 32, 32, 8], [2, 32, 32, 0]]"], "batch_size 0 must be >= 1"),
    (["data.mix_images=100"], "must then be bucketed"),
    (["data.buckets=[[4, 32, 32, 8], [3, 32, 32, 8, -1]]"], "weight -1 must be a number > 0"),
])
def test_a_bad_bucket_table_is_an_error_at_start(tmp_path, capsys, sets, message):
    config = tmp_path / "v.toml"
    config.write_text(load_config(None, video_sets()).to_toml())
    code, said = cli(["train", str(config), "--out", str(tmp_path / "run"), "--quiet",
                      *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 2 and message in said and "Traceback" not in said, said
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_init_from_a_video_run_or_an_image_mmdit_starts_from_its_weights(video_run, tmp_path):
    from safetensors.torch import save_file

    from patchflow.models.mmdit import MMDiT
    from patchflow.models.text_config import MMDiTConfig
    from patchflow.train.trainer import Trainer

    trainer = Trainer(load_config(None, video_sets(f"train.init_from=\"{video_run}\"")), tmp_path / "a",
                      progress=False)
    ema = load_file(str(video_run / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in trainer.net.state_dict().items() if k in ema)
    image = MMDiT(MMDiTConfig(input_size=32, in_channels=3, patch_size=8, hidden_size=32, depth=2, num_heads=2,
                              text_dim=384, pooled_dim=384))
    save_file(image.state_dict(), str(tmp_path / "image.safetensors"))
    trainer = Trainer(load_config(None, video_sets(f"train.init_from=\"{tmp_path / 'image.safetensors'}\"",
                                                   "model.attention=\"factorized\"")), tmp_path / "b",
                      progress=False)
    state = trainer.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in image.state_dict().items())
    with pytest.raises(ConfigError, match="train.init_from"):
        Trainer(load_config(None, video_sets(f"train.init_from=\"{tmp_path / 'image.safetensors'}\"",
                                             "model.hidden_size=64")), tmp_path / "c", progress=False)


def test_video_settings_on_an_image_model_are_config_errors():
    with pytest.raises(ConfigError, match="train.pack_tokens is a video setting"):
        load_config("color-digits", ["train.pack_tokens=64", "repa.encoder=\"\""])  # REPA refuses packing first
    with pytest.raises(ConfigError, match="model.frames = 8 does not match the data: data.frames = 4"):
        load_config(None, video_sets("model.frames=8"))


# ---- kill -9 and exact resume of a bucketed, packed video run ---------------------------------------------
@pytest.mark.parametrize("kind", ["packed", "bucketed"])
def test_kill_9_then_resume_of_a_video_run_is_bitwise_exact(kind, request, tmp_path):
    reference = request.getfixturevalue(f"{kind}_run")
    cfg = load_config(None, video_sets(*(PACKED if kind == "packed" else BUCKETED)))
    kill_9_then_resume(cfg, tmp_path, reference, start_timeout=180, resume_timeout=240)
