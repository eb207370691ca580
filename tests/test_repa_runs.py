"""REPA in real (tiny) runs: features cached once and reused, the projector kept out of the sampling weights, exact
resume after kill -9, and the refusals of bad encoders and stale caches (exit 2)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchflow.config import load_config
from patchflow.run_dir import latest_checkpoint
from patchflow.train.run import train
from patchflow.vision import WorldRecipe, train_world_encoder
from patchflow.vision.world import WorldEncoder
from run_helpers import cli, kill_9_then_resume, read_log

TINY = ["model.preset=\"DiT-Micro/4\"", "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
        "train.sample_every=0", "train.ema_decay=0.99", "sample.n=4", "sample.steps=4", "train.num_threads=1",
        "train.checkpoint_every=4", "train.keep_checkpoints=2", "model.depth=2"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = load_config("digits").data
    return [train_world_encoder(data, root / name, WorldRecipe(steps=2, items=64, batch_size=16, width=8, dim=16,
                                                               seed=seed), progress=False)
            for name, seed in (("a", 0), ("b", 1))]


def repa_cfg(encoder, *extra, steps=8):
    return load_config("digits", TINY + [f"train.steps={steps}", f"repa.encoder=\"{encoder}\"", "repa.depth=1",
                                         "repa.projector_dim=32", *extra])


@pytest.fixture(scope="module")
def reference(encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("repa") / "run"
    train(repa_cfg(encoders[0]), out, progress=False)
    return out


def test_features_are_computed_once_then_a_run_calls_no_encoder(encoders, tmp_path, monkeypatch):
    calls = []
    real = WorldEncoder.features
    monkeypatch.setattr(WorldEncoder, "features", lambda self, x: calls.append(len(x)) or real(self, x))
    train(repa_cfg(encoders[0], steps=2), tmp_path / "first", progress=False)
    assert sum(calls) == 4500  # every training item once, into the cache
    calls.clear()
    train(repa_cfg(encoders[0], steps=3), tmp_path / "second", progress=False)
    assert calls == []  # the cache is read; no step runs the encoder
    log = read_log(tmp_path / "second")
    assert all(-1.0 <= r["repa"] <= 1.0 for r in log) and len(log) == 3


def test_the_projector_is_kept_in_the_checkpoint_and_out_of_the_sampling_weights(reference):
    import patchflow

    ckpt = latest_checkpoint(reference)
    projector = load_file(str(ckpt / "repa.safetensors"))
    assert projector and all(k.startswith("repa_projector.") for k in projector)
    for weights in (reference / "model.safetensors", reference / "ema.safetensors", ckpt / "model.safetensors",
                    ckpt / "ema.safetensors"):
        assert not any("repa" in k for k in load_file(str(weights))), weights
    model = patchflow.load(reference)
    assert not any("repa" in k for k in model.state_dict()) and not hasattr(model, "repa_projector")
    # the alignment term pulled the projected hidden states toward the features: it fell over the run
    log = read_log(reference)
    assert log[-1]["repa"] < log[0]["repa"]


def test_kill_9_then_resume_with_repa_is_bitwise_exact(encoders, reference, tmp_path):
    kill_9_then_resume(repa_cfg(encoders[0]), tmp_path, reference)
    ckpt = latest_checkpoint(tmp_path / "run")
    a, b = load_file(str(ckpt / "repa.safetensors")), load_file(str(latest_checkpoint(reference) / "repa.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_of_another_encoder_is_refused_with_the_rebuild_command(encoders, tmp_path, capsys):
    cache = tmp_path / "features"
    args = ["train", "digits", "--quiet"] + [a for s in TINY + ["train.steps=1", "repa.depth=1",
                                                                 f"repa.cache=\"{cache}\""] for a in ("--set", s)]
    code, out = cli(["cache", "digits", "--quiet", "--features", str(cache), "--set",
                     f"repa.encoder=\"{encoders[0]}\""], capsys)
    assert code == 0, out
    code, out = cli(args + ["--out", str(tmp_path / "ok"), "--set", f"repa.encoder=\"{encoders[0]}\""], capsys)
    assert code == 0, out
    code, out = cli(args + ["--out", str(tmp_path / "stale"), "--set", f"repa.encoder=\"{encoders[1]}\""], capsys)
    assert code == 2 and "encoder" in out and f"patchflow cache CONFIG --features {cache}" in out, out


@pytest.mark.parametrize("sets, message", [
    (["repa.encoder=\"{missing}\""], "no such directory"),
    (["repa.encoder=\"{a}\"", "repa.depth=3"], "repa.depth = 3 is beyond the model's 2 blocks"),
])
def test_bad_encoders_and_depths_exit_2_with_the_reason(encoders, tmp_path, capsys, sets, message):
    values = {"missing": tmp_path / "nowhere", "a": encoders[0]}
    args = ["train", "digits", "--quiet", "--out", str(tmp_path / "run")]
    for s in TINY + ["train.steps=1"] + [s.format(**values) for s in sets]:
        args += ["--set", s]
    code, out = cli(args, capsys)
    assert code == 2 and message in out, out
    assert not (Path(tmp_path / "run") / "log.jsonl").exists()
