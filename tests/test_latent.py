"""Latent runs end to end: a codec run, a DiT on its latents, latent caches, bad input, kill -9 and resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from patchflow import codecs
from patchflow.cli import main
from patchflow.config import load_config
from patchflow.data import build_dataset
from patchflow.data.latent_cache import CacheError, LatentCacheDataset, build_cache, default_cache_dir
from patchflow.pipeline import Pipeline
from patchflow.train.run import train
from patchflow.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CODEC = ["model.arch=\"autoencoder\"", "model.in_channels=1", "model.latent_channels=2", "model.channels=[8, 8]",
         "train.batch_size=16", "train.lr=2e-3", "train.log_every=1", "train.sample_every=0",
         "train.ema_decay=0.9", "train.checkpoint_every=100", "train.num_threads=1"]
DIT = ["model.preset=\"DiT-Micro/4\"", "model.input_size=16", "model.in_channels=2", "train.batch_size=16",
       "train.lr=1e-3", "train.log_every=1", "train.sample_every=0", "train.ema_decay=0.99", "sample.n=4",
       "sample.steps=4", "train.num_threads=1", 'repa.encoder=""']


def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("codec") / "run"
    n = torch.get_num_threads()
    train(load_config("codec-digits", CODEC + ["train.steps=8"]), out, progress=False)
    torch.set_num_threads(n)
    return out


def latent_cfg(codec_run, *extra):
    return load_config("digits", DIT + [f"codec.source=\"{codec_run}\""] + list(extra))


def test_a_codec_run_exports_its_codec_with_unit_latent_statistics(codec_run):
    meta = json.loads((codec_run / "codec" / "codec.json").read_text())
    assert meta["kind"] == "kl" and meta["compression"] == 1 * 2 * 2 / 2 and meta["val_psnr_db"] > 5
    c = codecs.load(codec_run)  # a run directory gives its codec
    assert c.latent_channels == 2 and c.space_factor == 2
    data = build_dataset(load_config("digits").data)
    x = torch.stack([data[i][0] for i in range(2048)])
    z = c.encode(x)  # (N, 2, 1, 16, 16)
    per_channel = z.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(2), atol=1e-3, rtol=0)
    ema = load_file(str(codec_run / "ema.safetensors"))
    assert torch.equal(c.state_dict()["decoder.conv_out.weight"], ema["codec.decoder.conv_out.weight"])


def test_latent_run_trains_on_cached_latents_and_samples_pixels(codec_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    cfg = latent_cfg(codec_run, "train.steps=6", "train.checkpoint_every=6")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert not trainer.encode and isinstance(trainer.dataset, LatentCacheDataset)
    assert trainer.dataset.latents.shape == (4500, 2, 1, 16, 16)
    calls = []
    encode = trainer.codec.encode
    monkeypatch.setattr(trainer.codec, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    trainer.fit()
    assert calls == []  # a training step with a cache does no encoding
    assert (tmp_path / "run" / "codec" / "codec.json").is_file()  # the run keeps its own codec
    pipe = Pipeline.load(tmp_path / "run", device="cpu")
    images = pipe([3, 7], steps=2, seed=0)
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    # the pipeline decodes: its images are the codec's decode of the sampled latents
    from patchflow.pipeline import generate
    z = generate(pipe.model, cfg, torch.tensor([3, 7]), steps=2, seed=0)
    assert z.shape == (2, 2, 1, 16, 16)
    pixels = pipe.codec.decode(z)
    assert np.array_equal(images, ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, :, 0]
                          .permute(0, 2, 3, 1).numpy())


def test_without_a_cache_every_step_encodes_and_the_losses_match(codec_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cached"
    train(latent_cfg(codec_run, "train.steps=4"), cached, progress=False)
    trainer = Trainer(latent_cfg(codec_run, "train.steps=4", "codec.cache=\"off\""), tmp_path / "off", progress=False)
    assert trainer.encode
    calls = []
    encode = trainer.codec.encode
    monkeypatch.setattr(trainer.codec, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    trainer.fit()
    assert len(calls) == 4
    a, b = [r["loss"] for r in read_log(cached)], [r["loss"] for r in read_log(tmp_path / "off")]
    np.testing.assert_allclose(a, b, rtol=1e-4)  # the same latents either way


def test_a_stale_or_foreign_cache_is_refused(codec_run, tmp_path):
    cfg = latent_cfg(codec_run)
    c = codecs.load(codec_run)
    build_cache(tmp_path / "c", cfg.data, c, progress=False)
    LatentCacheDataset(tmp_path / "c", cfg.data, c.identity())  # matches
    with torch.no_grad():
        c.decoder.conv_in.weight.mul_(1.01)  # a retrained codec
    with pytest.raises(CacheError, match=r"is stale: it was made with codec kl v1 #\w+ but this run's codec is kl v1"):
        LatentCacheDataset(tmp_path / "c", cfg.data, c.identity())
    other = load_config("digits", DIT + [f"codec.source=\"{codec_run}\"", "data.seed=1"])
    with pytest.raises(CacheError, match=r"made from other data \(data.seed differ"):
        LatentCacheDataset(tmp_path / "c", other.data, codecs.load(codec_run).identity())
    # through the CLI: a run pointed at the stale cache stops before training, exit code 2
    c2 = tmp_path / "codec2"
    codecs.save(c, c2)
    code = main(["train", "digits", "--out", str(tmp_path / "r"), "--quiet"]
                + [a for s in DIT + [f"codec.source=\"{c2}\"", f"codec.cache=\"{tmp_path / 'c'}\""]
                   for a in ("--set", s)])
    assert code == 2 and not (tmp_path / "r" / "log.jsonl").exists()


def test_cache_command_writes_once_and_names_bad_configs(codec_run, tmp_path, capsys):
    sets = [a for s in DIT + [f"codec.source=\"{codec_run}\""] for a in ("--set", s)]
    assert main(["cache", "digits", "--out", str(tmp_path / "c"), "--quiet"] + sets) == 0
    assert "wrote 4500 latents (2, 1, 16, 16) of digits" in capsys.readouterr().out
    assert main(["cache", "digits", "--out", str(tmp_path / "c"), "--quiet"] + sets) == 0
    assert "is up to date (4500 items" in capsys.readouterr().out
    assert main(["cache", "digits", "--quiet"]) == 2
    assert "codec.source = \"identity\": it trains on pixels, which need no cache" in capsys.readouterr().err
    assert main(["cache", "codec-digits", "--quiet"]) == 2
    assert "trains a codec on pixels" in capsys.readouterr().err


def test_default_cache_location_depends_on_codec_and_data(codec_run):
    cfg = latent_cfg(codec_run)
    ident = codecs.load(codec_run).identity()
    a = default_cache_dir(cfg.data, ident)
    assert a == default_cache_dir(load_config("digits", DIT).data, ident)
    assert a != default_cache_dir(load_config("digits", ["data.seed=3"]).data, ident)
    assert a != default_cache_dir(cfg.data, {**ident, "sha256": "0"})


@pytest.mark.parametrize("extra,message", [
    (["model.in_channels=4"], "model.in_channels = 4 does not match codec.source = .*: the codec has 2 latent "
                              "channels; set model.in_channels = 2"),
    (["model.input_size=32"], "model.input_size = 32 does not match .*: the codec turns 32x32 images into 16x16 "
                              "latents; set model.input_size = 16"),
])
def test_a_run_whose_model_does_not_fit_its_codec_is_refused(codec_run, tmp_path, capsys, extra, message):
    sets = DIT + [f"codec.source=\"{codec_run}\""] + extra
    assert main(["train", "digits", "--out", str(tmp_path / "r"), "--quiet"] + [a for s in sets for a in ("--set", s)]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)


def test_missing_or_incomplete_codec_directories_exit_2(codec_run, tmp_path, capsys):
    def run(source):
        sets = DIT + [f"codec.source=\"{source}\""]
        return main(["train", "digits", "--out", str(tmp_path / "r"), "--quiet"] + [a for s in sets for a in ("--set", s)])

    assert run(tmp_path / "missing") == 2
    assert "not found: give 'identity', a shipped codec preset (codec-" in capsys.readouterr().err
    broken = tmp_path / "broken"
    codecs.save(codecs.load(codec_run), broken)
    (broken / "codec.json").unlink()
    assert run(broken) == 2
    assert "is incomplete: codec.json missing" in capsys.readouterr().err


def test_input_the_codec_cannot_take_exits_2(tmp_path, capsys):
    video = tmp_path / "video"
    train(load_config("codec-digits", CODEC + ["train.steps=1", "model.in_channels=3", "model.time_downsample=2",
                                               "data.dataset=\"moving-digits\"", "data.frames=3"]), video,
          progress=False)
    c = codecs.load(video)
    assert c.causal and c.time_factor == 2
    sets = DIT + [f"codec.source=\"{video}\"", "data.dataset=\"moving-digits\"", "data.frames=4"]
    assert main(["cache", "digits", "--quiet"] + [a for s in sets for a in ("--set", s)]) == 2
    assert "cannot take this run's data (3 channels, 4 frame(s), 32x32)" in capsys.readouterr().err
    # and a codec run whose clips do not suit its time compression is refused before it starts
    code = main(["train", "codec-digits", "--out", str(tmp_path / "v2"), "--quiet"]
                + [a for s in CODEC + ["model.in_channels=3", "model.time_downsample=2",
                                       "data.dataset=\"moving-digits\"", "data.frames=4"] for a in ("--set", s)])
    assert code == 2
    assert "data.frames = 4 does not suit model.time_downsample = 2" in capsys.readouterr().err


# ---- kill -9 in a latent run, then resume: bitwise the same run ----------------------------------------------
def _launch(out, codec_run, logfile, resume):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    sets = DIT + [f"codec.source=\"{codec_run}\"", "train.steps=12", "train.checkpoint_every=3"]
    args = ["train", "digits", "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "patchflow"] + args + (["--resume"] if resume else []), cwd=REPO,
                            env=env, stdout=logfile, stderr=subprocess.STDOUT)


def test_kill_9_in_a_latent_run_then_resume_is_bitwise_exact(codec_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    train(latent_cfg(codec_run, "train.steps=12", "train.checkpoint_every=3"), ref, progress=False)
    out, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    with open(tmp_path / "stdout.txt", "w") as f:
        proc = _launch(out, codec_run, f, resume=False)
        deadline = time.monotonic() + 120
        while not (log.is_file() and log.read_bytes().count(b"\n") >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.003)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _launch(out, codec_run, f, resume=True).wait(timeout=120) == 0
    assert "resumed from" in (tmp_path / "stdout.txt").read_text()
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(ref)]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(ref / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.usefixtures("digit_classifier")  # scores digits: the session's one classifier, not a training of its own
def test_eval_of_a_codec_run_scores_its_reconstructions(codec_run, tmp_path, capsys):
    assert main(["eval", str(codec_run), "--per-class", "20", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n"] == 100 and r["compression"] == 2.0 and r["accuracy_original"] > 0.95
    assert 0 <= r["accuracy_reconstructed"] <= 1 and r["psnr_db"] > 5
    assert f"reconstruction PSNR {r['psnr_db']:.2f} dB, compression 2.0x" in out


def test_commands_that_do_not_apply_to_codec_runs_say_so(codec_run, tmp_path, capsys):
    assert main(["sample", str(codec_run), "--label", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "is a codec run: it encodes and decodes, it does not sample" in capsys.readouterr().err
    assert main(["plan", "codec-digits"]) == 2
    assert "plan sizes diffusion transformers" in capsys.readouterr().err
    assert main(["train", "codec-digits", "--out", str(tmp_path / "c"), "--set", "train.compile=true"]) == 2
    assert "train.compile is a switch for transformer blocks" in capsys.readouterr().err
    with pytest.raises(Exception, match="is a codec run"):
        Pipeline.load(codec_run)


def test_resume_refuses_another_codec(codec_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    train(latent_cfg(codec_run, "train.steps=2"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"--resume: codec.source = 'identity' differs from the run's"):
        Trainer(load_config("digits", DIT + ["model.in_channels=2"]), tmp_path / "run", resume=True, progress=False)


def test_a_codec_preset_is_trained_into_the_cache_once_when_missing(tmp_path, monkeypatch):
    import patchflow.train.run as run_mod
    from patchflow.codecs.presets import cached_codec_dir

    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    real_load = run_mod.load_config
    monkeypatch.setattr(run_mod, "load_config", lambda name, *a: real_load(name, CODEC[4:] + ["train.steps=2"]))
    trained = []
    real_train = run_mod.train
    monkeypatch.setattr(run_mod, "train", lambda *a, **k: trained.append(a[1]) or real_train(*a, **k))
    with pytest.raises(codecs.CodecError, match="codec preset 'codec-digits' is not trained on this machine yet"):
        codecs.load("codec-digits")
    first = run_mod.ensure_codec("codec-digits", progress=False)
    assert trained == [cached_codec_dir("codec-digits")] and first.latent_channels == 4
    second = run_mod.ensure_codec("codec-digits", progress=False)  # cached now: no training
    assert len(trained) == 1 and second.identity() == first.identity()
    assert codecs.load("codec-digits").identity() == first.identity()
