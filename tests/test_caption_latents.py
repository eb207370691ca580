"""A text run on a user's captions file through a codec: latents cached once, captions from the file by index.

A 16-image captions file (16x16 noise PNGs), an untrained tiny KL codec saved as a codec directory (16x16 ->
3x4x4 latents), a tiny MMDiT or VideoDiT, the real MiniLM encoder with text.cache = "off"; one thread. Also a file
that mixes images and clips (latents of two sizes in one cache) under data.buckets, through a causal video codec.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchflow import codecs
from patchflow.clip_files import write_clip
from patchflow.codecs.autoencoder import AutoencoderConfig, KLAutoencoder
from patchflow.config import load_config
from patchflow.data import WithCaptions, build_dataset
from patchflow.data.buckets import CutClips
from patchflow.data.latent_cache import CacheError, LatentCacheDataset, build_cache, default_cache_dir
from patchflow.train.trainer import Trainer

from run_helpers import cli, read_log

N, SIZE = 16, 16


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_codec(directory: Path, time_downsample: int = 1) -> Path:
    torch.manual_seed(0)
    c = KLAutoencoder(AutoencoderConfig(in_channels=3, channels=[8, 16, 16], latent_channels=3,
                                        time_downsample=time_downsample)).eval()
    return codecs.save(c, directory)


def noise(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_captions(root: Path, n: int = N) -> Path:
    for i in range(n):
        Image.fromarray(noise(i, (SIZE, SIZE, 3))).save(root / f"{i}.png")
    lines = [json.dumps({"image": f"{i}.png", "caption": f"picture number {i}"}) for i in range(n)]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def image_sets(captions: Path, codec: Path, *extra) -> list[str]:
    return ["model.arch=\"mmdit\"", "model.input_size=4", "model.in_channels=3", "model.patch_size=2",
            "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.text_dim=384",
            "model.pooled_dim=384", "data.dataset=\"captions\"", f"data.path=\"{captions}\"",
            f"data.image_size={SIZE}", f"codec.source=\"{codec}\"", "text.cache=\"off\"", "train.batch_size=8",
            "train.steps=3", "train.lr=1e-3", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=100", "train.num_threads=1", *extra]


def encode_items(codec_dir: Path, data) -> list[torch.Tensor]:
    """codec.encode of every pixel item of the data set, one at a time: [(c, t, h, w)]."""
    c = codecs.load(codec_dir)
    return [c.encode(data[i][0][None])[0] for i in range(len(data))]


def check_cached(trainer: Trainer, codec_dir: Path, captions: Path) -> None:
    """The trainer's data: latents from the cache equal to codec.encode of item i, captions item i's line."""
    assert not trainer.encode
    data = trainer.dataset
    assert isinstance(data, WithCaptions) and isinstance(data.inputs, LatentCacheDataset)
    assert data.inputs.directory == default_cache_dir(trainer.cfg.data, trainer.codec.identity())
    assert (data.inputs.directory / "cache.json").is_file()
    assert (data.inputs.directory / "shard_00000.safetensors").is_file()
    meta = json.loads((data.inputs.directory / "cache.json").read_text())
    assert meta["fields"] == ["latent"] and meta["items"] == len(data)  # a captions file's cache stores no label
    pixels = build_dataset(trainer.cfg.data, text=True)
    want_captions = [json.loads(line)["caption"] for line in captions.read_text().splitlines()]
    assert data.captions() == want_captions
    for i, want in enumerate(encode_items(codec_dir, pixels)):
        z, caption = data[i]
        assert caption == want_captions[i]
        torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-5)


def test_captions_file_trains_on_cached_latents_paired_with_its_captions(tmp_path):
    captions, codec_dir = write_captions(tmp_path), make_codec(tmp_path / "codec")
    cfg = load_config(None, image_sets(captions, codec_dir))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    check_cached(trainer, codec_dir, captions)
    # every training batch pairs item i's latent with caption i
    latents = torch.stack([trainer.dataset[i][0] for i in range(N)])
    seen_x, seen_y = [], []
    loss, train_cond = trainer.objective.loss, trainer.conditioning.train
    trainer.objective.loss = lambda fn, x0, *a, **k: seen_x.append(x0.clone()) or loss(fn, x0, *a, **k)
    trainer.conditioning.train = lambda y, *a, **k: seen_y.append(list(y)) or train_cond(y, *a, **k)
    calls = []
    encode = trainer.codec.encode
    trainer.codec.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    trainer.fit()
    assert calls == []  # the steps read cached latents
    assert len(seen_x) == len(seen_y) == 3
    for x0, ys in zip(seen_x, seen_y):
        for z, y in zip(x0, ys):
            i = int((latents - z).flatten(1).abs().amax(1).argmin())
            assert torch.equal(latents[i], z) and y == f"picture number {i}"
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)

    # codec.cache = "off": every step encodes the images, to the same latents, so the same losses
    off = Trainer(load_config(None, image_sets(captions, codec_dir, "codec.cache=\"off\"")), tmp_path / "off",
                  progress=False)
    assert off.encode and not isinstance(off.dataset, WithCaptions)
    off.fit()
    np.testing.assert_allclose([r["loss"] for r in read_log(tmp_path / "off")], [r["loss"] for r in log], rtol=1e-4)


def test_an_edited_captions_file_or_image_gets_a_new_cache_not_stale_latents(tmp_path):
    captions, codec_dir = write_captions(tmp_path), make_codec(tmp_path / "codec")
    cfg = lambda: load_config(None, image_sets(captions, codec_dir))  # noqa: E731
    first = Trainer(cfg(), tmp_path / "a", progress=False)
    first_dir = first.dataset.inputs.directory

    lines = captions.read_text().splitlines()
    lines[3] = json.dumps({"image": "3.png", "caption": "a new caption"})
    captions.write_text("\n".join(lines) + "\n")
    second = Trainer(cfg(), tmp_path / "b", progress=False)
    assert second.dataset.inputs.directory != first_dir and second.dataset[3][1] == "a new caption"
    check_cached(second, codec_dir, captions)

    Image.fromarray(noise(99, (SIZE, SIZE, 3))).save(tmp_path / "5.png")  # same name, other pixels
    third = Trainer(cfg(), tmp_path / "c", progress=False)
    assert third.dataset.inputs.directory not in (first_dir, second.dataset.inputs.directory)
    check_cached(third, codec_dir, captions)
    assert not torch.allclose(third.dataset[5][0], second.dataset[5][0])

    # a cache directory given by name is refused once its file changed, saying why
    c = codecs.load(codec_dir)
    build_cache(tmp_path / "named", cfg().data, c, progress=False)
    LatentCacheDataset(tmp_path / "named", cfg().data, c.identity())
    os.utime(tmp_path / "0.png", ns=(1, 1))
    with pytest.raises(CacheError, match=r"is stale: the captions file data.path = .* or the images and clips it "
                                         r"names changed since the cache was built"):
        LatentCacheDataset(tmp_path / "named", cfg().data, c.identity())


# ---- a file of images and clips: latents of two sizes ------------------------------------------------------
def write_mixed(root: Path, clips: int = 8, images: int = 4, frames: int = 5) -> Path:
    lines = []
    for i in range(clips):
        write_clip(root / f"clip{i}.gif", (noise(100 + i, (frames, SIZE, SIZE, 1)) // 128 * 255).repeat(3, -1))
        lines.append({"video": f"clip{i}.gif", "caption": f"clip number {i}"})
    for i in range(images):
        Image.fromarray(noise(i, (SIZE, SIZE, 3))).save(root / f"{i}.png")
        lines.append({"image": f"{i}.png", "caption": f"picture number {i}"})
    (root / "mixed.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root / "mixed.jsonl"


def video_sets(captions: Path, codec: Path, *extra) -> list[str]:
    # a causal codec (time / 2): 5 pixel frames -> 3 latent frames, 3 -> 2, 1 -> 1
    return ["model.arch=\"video\"", "model.input_size=4", "model.frames=3", "model.in_channels=3",
            "model.patch_size=2", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
            "model.text_dim=384", "model.pooled_dim=384", "data.dataset=\"captions\"", f"data.path=\"{captions}\"",
            f"data.image_size={SIZE}", "data.frames=5", "data.buckets=[[1, 16, 16, 2], [3, 16, 16, 2], [5, 16, 16, 1]]",
            f"codec.source=\"{codec}\"", "text.cache=\"off\"", "train.batch_size=2", "train.steps=4", "train.lr=1e-3",
            "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=100", "train.num_threads=1", *extra]


def test_a_file_of_images_and_clips_caches_latents_of_each_size_and_trains_like_encoding_each_step(tmp_path, capsys):
    captions, codec_dir = write_mixed(tmp_path), make_codec(tmp_path / "codec", time_downsample=2)
    cfg = load_config(None, video_sets(captions, codec_dir))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert isinstance(trainer.dataset, CutClips)  # the buckets cut some clips (to 3 frames: 2 latent frames)
    cache = trainer.dataset.dataset.inputs  # CutClips(WithCaptions(cache, captions))
    assert isinstance(cache, LatentCacheDataset) and isinstance(cache.latents, list)
    meta = json.loads((cache.directory / "cache.json").read_text())
    assert meta["latent_shape"] is None and meta["latent_shapes"] == [[3, 1, 4, 4], [3, 3, 4, 4]]
    pixels = build_dataset(cfg.data, text=True)
    for i, want in enumerate(encode_items(codec_dir, pixels)):
        assert cache[i][0].shape == want.shape == ((3, 3, 4, 4) if i < 8 else (3, 1, 4, 4))
        torch.testing.assert_close(cache[i][0], want, rtol=1e-5, atol=1e-5)
    assert trainer.dataset.dataset.captions() == [f"clip number {i}" for i in range(8)] + \
        [f"picture number {i}" for i in range(4)]
    trainer.fit()
    cached = [r["loss"] for r in read_log(tmp_path / "run")]
    assert len(cached) == 4 and all(np.isfinite(cached))
    # encoding every step (clips cut in pixel frames for the buckets, then encoded) gives the same losses
    Trainer(load_config(None, video_sets(captions, codec_dir, "codec.cache=\"off\"")), tmp_path / "off",
            progress=False).fit()
    np.testing.assert_allclose([r["loss"] for r in read_log(tmp_path / "off")], cached, rtol=1e-4)
    # `patchflow cache` names both sizes, and finds the trainer's cache up to date
    config = tmp_path / "t2v.toml"
    config.write_text(cfg.to_toml())
    code, said = cli(["cache", str(config), "--quiet"], capsys)
    assert code == 0 and "is up to date (12 items, latents (3, 1, 4, 4) and (3, 3, 4, 4))" in said, said
