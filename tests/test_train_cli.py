"""End to end: a short training run, resume, the CLI's files and its error messages."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import patchflow
from patchflow.cli import main
from patchflow.config import load_config
from patchflow.train.run import train

TINY = ["model.preset=\"DiT-Micro/4\"", "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
        "train.sample_every=0", "train.ema_decay=0.99", "sample.n=4", "sample.steps=4", 'repa.encoder=""']


def tiny_cfg(*extra):
    return load_config("digits", TINY + list(extra))


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run30(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r30"
    train(tiny_cfg("train.steps=30", "train.checkpoint_every=10", "train.warmup_steps=5"), out, progress=False)
    return out


def test_training_lowers_the_loss(run30):
    log = read_log(run30)
    assert [r["step"] for r in log] == list(range(1, 31))  # log_every = 1: every step
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.8 * first
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in log)


def test_run_directory_layout(run30):
    for name in ("config.toml", "model.safetensors", "ema.safetensors", "log.jsonl"):
        assert (run30 / name).is_file()
    assert (run30 / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    assert sorted(p.name for p in (run30 / "checkpoints").iterdir() if p.is_dir()) == [
        "step_0000010", "step_0000020", "step_0000030"]
    model = patchflow.load(run30)
    ema = load_file(str(run30 / "ema.safetensors"))
    raw = load_file(str(run30 / "model.safetensors"))
    assert torch.equal(model.state_dict()["final_layer.linear.weight"], ema["final_layer.linear.weight"])
    assert not torch.equal(ema["final_layer.linear.weight"], raw["final_layer.linear.weight"])  # EMA is not raw
    assert not model.training


def test_resume_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg("train.steps=12", "train.checkpoint_every=6"), straight, progress=False)
    train(tiny_cfg("train.steps=6", "train.checkpoint_every=6"), resumed, progress=False)
    train(tiny_cfg("train.steps=12", "train.checkpoint_every=6"), resumed, resume=True, progress=False)
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(resumed)]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    e1, e2 = load_file(str(straight / "ema.safetensors")), load_file(str(resumed / "ema.safetensors"))
    assert all(torch.equal(e1[k], e2[k]) for k in e1)


def test_sample_writes_documented_npz(run30, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(run30), "--label", "7", "--n", "3", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (3, 32, 32, 1)
        assert f["labels"].tolist() == [7, 7, 7]
    out_all = tmp_path / "all.npz"
    assert main(["sample", str(run30), "--labels-all", "2", "--steps", "2", "--out", str(out_all), "--quiet"]) == 0
    with np.load(out_all) as f:
        assert f["images"].shape == (20, 32, 32, 1) and np.bincount(f["labels"]).tolist() == [2] * 10
    png = tmp_path / "g.png"
    assert main(["sample", str(run30), "--label", "1", "--n", "4", "--steps", "2", "--out", str(png), "--quiet"]) == 0
    from PIL import Image
    assert Image.open(png).size == (4 * 34 + 2, 34 + 2)


def test_sampling_is_deterministic_in_the_seed(run30):
    pipe = patchflow.Pipeline.load(run30, device="cpu")
    a, b = pipe([1, 2], steps=3, seed=5), pipe([1, 2], steps=3, seed=5)
    c = pipe([1, 2], steps=3, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("argv,message", [
    (["train", "digits", "--set", "train.stepz=3"], "unknown key train.stepz"),
    (["train", "digits", "--set", "model.num_heads=3"], "does not divide model.hidden_size"),
    (["train", "nope.toml"], "config file 'nope.toml' not found"),
    (["sample", "RUN", "--label", "10", "--out", "x.npz"], "--label 10 is out of range"),
    (["sample", "RUN", "--label", "1", "--out", "x.jpg"], "must end in .png"),
    (["sample", "RUN", "--label", "1", "--steps", "0", "--out", "x.npz"], "--steps must be in 1..1000"),
    (["sample", "MISSING", "--label", "1", "--out", "x.npz"], "is not a patchflow run directory"),
])
def test_bad_input_gets_a_clear_error(run30, tmp_path, capsys, argv, message):
    argv = [str(run30) if a == "RUN" else str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    argv = [str(tmp_path / a) if a.endswith((".npz", ".jpg")) else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_checkpoint_file(run30, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(run30, broken)
    (broken / "ema.safetensors").unlink()
    shutil.rmtree(broken / "checkpoints")
    assert main(["sample", str(broken), "--label", "1", "--out", str(tmp_path / "x.npz"), "--quiet"]) == 2
    assert "ema.safetensors is missing" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(run30, capsys):
    before = (run30 / "log.jsonl").read_text()
    assert main(["train", "digits", "--out", str(run30), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run30 / "log.jsonl").read_text() == before


@pytest.mark.usefixtures("digit_classifier")  # scores digits: the session's one classifier, not a training of its own
def test_eval_reads_an_npz_of_real_digits(tmp_path, capsys):
    from patchflow.data.digits import load_digits

    images, labels = load_digits("train")
    npz = tmp_path / "real.npz"
    np.savez(npz, images=images[::9][:300, :, :, None], labels=labels[::9][:300])
    assert main(["eval", str(npz), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 300 and result["accuracy"] > 0.95
    assert f"class accuracy: {result['accuracy']:.4f}" in out and "real-data ceiling" in out
    np.savez(npz, images=images[:10, :, :, None])  # no labels
    assert main(["eval", str(npz)]) == 2
    assert "lacks ['labels']" in capsys.readouterr().err


@pytest.mark.usefixtures("digit_classifier")  # scores digits: the session's one classifier, not a training of its own
def test_demo_writes_grid_and_scores(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quiet"] + [a for s in TINY + ["train.steps=3", "sample.steps=2"]
                                                      for a in ("--set", s)]
    assert main(argv) == 0
    from PIL import Image
    assert Image.open(out / "demo_grid.png").size == (10 * 34 + 2, 10 * 34 + 2)
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 500 and 0 <= result["accuracy"] <= 1 and result["fd"] > 0
    assert f"class accuracy {result['accuracy']:.4f}" in capsys.readouterr().out
