"""Text-to-image runs end to end: the trainer, the sampler, the CLI and the Python pipeline on a text model.

A tiny MMDiT (and CrossDiT) on a 40-image captions file (16x16 RGB squares), the real MiniLM encoder, one thread.
"""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from patchflow.config import ConfigError, load_config
from patchflow.pipeline import Pipeline
from patchflow.train.run import train

from run_helpers import cli, kill_9_then_resume, read_log

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
STEPS = 12


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """captions.jsonl: 40 16x16 images, a coloured square on black, 'a red square on the left' etc."""
    root = tmp_path_factory.mktemp("captions")
    rng = random.Random(0)
    lines = []
    for i in range(40):
        name, side = rng.choice(list(COLORS)), rng.choice(["left", "right"])
        im = np.zeros((16, 16, 3), np.uint8)
        x0 = 1 if side == "left" else 9
        im[5:11, x0:x0 + 6] = COLORS[name]
        Image.fromarray(im).save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {name} square on the {side}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def text_sets(captions, arch="mmdit", *extra):
    return [f"model.arch=\"{arch}\"", "model.input_size=16", "model.in_channels=3", "model.patch_size=4",
            "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.text_dim=384", "model.pooled_dim=384",
            "data.dataset=\"captions\"", f"data.path=\"{captions}\"", "data.image_size=16", "train.batch_size=8",
            f"train.steps={STEPS}", "train.lr=1e-3", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=4", "train.num_threads=1", "train.ema_decay=0.9", "sample.steps=3",
            "sample.n=4", *extra]


@pytest.fixture(autouse=True)
def _cache(session_cache, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(session_cache))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text_run(captions, tmp_path_factory, session_cache):
    os.environ["PATCHFLOW_CACHE"] = str(session_cache)
    out = tmp_path_factory.mktemp("t2i") / "run"
    train(load_config(None, text_sets(captions)), out, progress=False)
    return out


def test_text_run_trains_with_cached_embeddings_equal_to_live_encoding(text_run, captions, tmp_path):
    live = tmp_path / "live"
    train(load_config(None, text_sets(captions, "mmdit", "text.cache=\"off\"")), live, progress=False)
    assert [r["loss"] for r in read_log(text_run)] == [r["loss"] for r in read_log(live)]
    assert len(read_log(text_run)) == STEPS and all(np.isfinite(r["loss"]) for r in read_log(text_run))
    weights = load_file(str(text_run / "model.safetensors"))
    assert not any(k.startswith(("encoder", "text_encoder", "bert")) for k in weights)  # the encoder is frozen, apart


def test_pipeline_samples_prompts_and_negative_prompt_steers(text_run):
    pipe = Pipeline.load(text_run, device="cpu")
    a = pipe(prompt="a red square on the left", n=2, seed=3)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    b = pipe(prompt=["a red square on the left", "a blue square on the right"], seed=3)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(b[0], b[1])  # one sample per prompt, in order
    c = pipe(prompt="a red square on the left", n=2, seed=3, negative_prompt="a blue square")
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="prompt"):
        pipe(labels=[1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        pipe(prompt="   ")
    wide = pipe(prompt="a red square on the left", n=1, size=(16, 24))  # another aspect ratio samples
    assert wide.shape == (1, 16, 24, 3)


def test_cli_sample_prompt_png_and_prompts_file_npz(text_run, tmp_path, capsys):
    code, said = cli(["sample", str(text_run), "--prompt", "a green square on the right", "--n", "3", "--out",
                      str(tmp_path / "a.png"), "--quiet"], capsys)
    assert code == 0, said
    assert Image.open(tmp_path / "a.png").size == (3 * 18 + 2, 18 + 2)  # 3 images of 16 px with 2 px padding
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red square on the left\n\n  a blue square on the right  \nwhite square\n")
    code, said = cli(["sample", str(text_run), "--prompts-file", str(prompts), "--out", str(tmp_path / "s.npz"),
                      "--seed", "5", "--quiet"], capsys)
    assert code == 0, said
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (3, 16, 16, 3) and f["images"].dtype == np.uint8
        assert f["prompts"].tolist() == ["a red square on the left", "a blue square on the right", "white square"]
        first = f["images"][0]
    single = Pipeline.load(text_run, device="cpu")(prompt=["a red square on the left"], seed=5)
    assert np.array_equal(single[0], first)  # the npz holds what the prompt samples alone with that seed


def test_cli_sample_at_another_size_and_aspect_ratio(text_run, tmp_path, capsys):
    code, said = cli(["sample", str(text_run), "--prompt", "a red square on the left", "--n", "2", "--size",
                      "16x24", "--out", str(tmp_path / "w.npz"), "--quiet"], capsys)
    assert code == 0, said
    with np.load(tmp_path / "w.npz") as f:
        assert f["images"].shape == (2, 16, 24, 3)


@pytest.mark.parametrize("flags,message", [
    (["--prompt", "a red square", "--size", "16by24"], "--size must be HEIGHTxWIDTH"),
    (["--prompt", "a red square", "--size", "16x1000"], "exceeds the position table"),
    (["--prompt", "a red square", "--size", "16x18"], "size 16x18 must be positive multiples of the patch size 4"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--label", "3"], "--label is for class-conditional runs"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file '/nonexistent/prompts.txt' does not exist"),
    ([], "say what to sample: --prompt TEXT"),
])
def test_bad_sampling_input_on_a_text_run_exits_2_with_a_message(text_run, tmp_path, capsys, flags, message):
    code, said = cli(["sample", str(text_run), *flags, "--out", str(tmp_path / "x.png"), "--quiet"], capsys)
    assert code == 2 and message in said and "Traceback" not in said


def test_prompt_on_a_class_run_exits_2(tmp_path, capsys):
    run = tmp_path / "digits"
    code, said = cli(["train", "digits", "--out", str(run), "--quiet", "--set", "model.preset=\"DiT-Micro/8\"",
                      "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "train.sample_every=0",
                      "--set", "train.num_threads=1"], capsys)
    assert code == 0, said
    code, said = cli(["sample", str(run), "--prompt", "a red 7", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--prompt is for text-to-image runs" in said


def test_over_long_prompt_is_truncated_with_a_warning_and_unknown_words_sample(text_run):
    pipe = Pipeline.load(text_run, device="cpu")
    with pytest.warns(UserWarning, match="max_length|truncat"):
        out = pipe(prompt="a red square " * 40, n=1)
    assert out.shape == (1, 16, 16, 3)
    assert pipe(prompt="a chartreuse blorp", n=1).shape == (1, 16, 16, 3)


def test_text_model_must_match_the_encoder_widths(captions, tmp_path):
    cfg = load_config(None, text_sets(captions, "mmdit", "model.text_dim=100"))
    with pytest.raises(ConfigError, match="model.text_dim = 100 does not match text.encoder = 'minilm'.*384"):
        train(cfg, tmp_path / "bad", progress=False)


def test_crossdit_baseline_trains_through_the_same_trainer(captions, tmp_path):
    out = train(load_config(None, text_sets(captions, "crossdit", "train.steps=4")), tmp_path / "x", progress=False)
    assert len(read_log(out)) == 4
    assert Pipeline.load(out, device="cpu")(prompt="a red square on the left", n=1).shape == (1, 16, 16, 3)


def test_class_arch_on_captions_and_text_arch_on_labels_are_config_errors(captions):
    with pytest.raises(ConfigError, match="model.arch = \"mmdit\""):
        load_config(None, [f"data.path=\"{captions}\"", "data.dataset=\"captions\""])
    with pytest.raises(ConfigError, match="learns from captions"):
        load_config(None, ["model.arch=\"mmdit\"", "data.dataset=\"digits\""])


# ---- kill -9 and exact resume of a text run ---------------------------------------------------------------
def test_kill_9_then_resume_of_a_text_run_is_bitwise_exact(text_run, captions, tmp_path):
    kill_9_then_resume(load_config(None, text_sets(captions)), tmp_path, text_run)


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "does not exist"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "t5"}')), "missing"),
])
def test_missing_or_incomplete_text_encoder_directory_exits_2_naming_it(captions, tmp_path, capsys, make, message):
    encoder = tmp_path / "encoder"
    make(encoder)
    config = tmp_path / "t2i.toml"
    config.write_text(load_config(None, text_sets(captions)).to_toml())
    code, said = cli(["train", str(config), "--out", str(tmp_path / "run"), "--quiet", "--set",
                      f"text.encoder=\"{encoder}\""], capsys)
    assert code == 2 and "Traceback" not in said, said
    assert str(encoder) in said and message in said, said
