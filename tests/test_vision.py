"""REPA's frozen encoders: transformers DINOv2 / SigLIP / CLIP directories (tiny random models saved to disk, since
none can be downloaded), and patchflow's own world encoder."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from patchflow.config import load_config
from patchflow.vision import VisionError, WorldRecipe, load_vision_encoder, train_world_encoder
from patchflow.vision.world import WorldEncoder, augment, contrastive_loss

TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _save(model, path):
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("encoders")
    return {
        "dinov2": _save(tf.Dinov2Model(tf.Dinov2Config(**TINY, image_size=28, patch_size=7)), root / "dinov2"),
        "siglip": _save(tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8)),
                        root / "siglip"),
        "clip": _save(tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY, image_size=32, patch_size=8)), root / "clip"),
    }


@pytest.fixture(scope="module")
def digits():
    return load_config("digits").data


@pytest.mark.parametrize("family, grid, prefix", [("dinov2", 4, 1), ("siglip", 4, 0), ("clip", 4, 1)])
def test_a_transformers_directory_loads_offline_and_gives_its_patch_tokens(hf_dirs, digits, family, grid, prefix):
    import transformers as tf

    encoder = load_vision_encoder(str(hf_dirs[family]), digits)
    assert encoder.dim == 16 and encoder.identity()["kind"].startswith("transformers:")
    x = torch.rand(2, 3, encoder.size, encoder.size) * 2 - 1
    f = encoder.features(x)
    assert f.shape == (2, grid, grid, 16)
    cls = {"dinov2": tf.Dinov2Model, "siglip": tf.SiglipVisionModel, "clip": tf.CLIPVisionModel}[family]
    model = cls.from_pretrained(hf_dirs[family]).eval()
    pixels = ((x + 1) / 2 - encoder.mean) / encoder.std
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state[:, prefix:].reshape(2, grid, grid, 16)
    torch.testing.assert_close(f, want)


def test_grey_data_of_another_size_is_resized_with_one_warning(hf_dirs, digits):
    encoder = load_vision_encoder(str(hf_dirs["dinov2"]), digits)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with pytest.warns(UserWarning, match="takes 28x28 images: the data's 32x32 are resized"):
        f = encoder.features(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.features(x)  # once only
    want = encoder.features(F.interpolate(x.expand(-1, 3, -1, -1), size=(28, 28), mode="bicubic"))
    torch.testing.assert_close(f, want)


def test_an_encoder_of_other_channels_is_refused(tmp_path, digits):
    net = WorldEncoder(train_world_encoder(digits, tmp_path / "w", WorldRecipe(steps=1, items=32, batch_size=8,
                                                                                width=8, dim=16), progress=False))
    with pytest.raises(VisionError, match="takes 1-channel images and the data has 3 channels"):
        net.features(torch.zeros(1, 3, 32, 32))


def test_missing_and_incomplete_directories_name_what_is_missing(hf_dirs, tmp_path, digits):
    with pytest.raises(VisionError, match="no such directory"):
        load_vision_encoder(str(tmp_path / "nowhere"), digits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisionError, match="neither config.json .* nor encoder.json"):
        load_vision_encoder(str(tmp_path / "empty"), digits)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dirs["siglip"] / "config.json").read_text())
    with pytest.raises(VisionError, match="model.safetensors .* is missing"):
        load_vision_encoder(str(broken), digits)
    (broken / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(VisionError, match="only pickled weights .pytorch_model.bin.; patchflow loads safetensors"):
        load_vision_encoder(str(broken), digits)
    (broken / "pytorch_model.bin").unlink()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    (broken / "model.safetensors").write_bytes((hf_dirs["siglip"] / "model.safetensors").read_bytes())
    with pytest.raises(VisionError, match="'bert' is not a vision encoder"):
        load_vision_encoder(str(broken), digits)
    world = train_world_encoder(digits, tmp_path / "w", WorldRecipe(steps=1, items=32, batch_size=8, width=8, dim=16),
                                progress=False)
    (world / "encoder.safetensors").unlink()
    with pytest.raises(VisionError, match="encoder.safetensors is missing"):
        load_vision_encoder(str(world), digits)


def test_contrastive_loss_closed_form():
    # two pairs, orthogonal: each view's partner has logit 1/tau, the two others 0 -> -log(e^(1/t) / (e^(1/t) + 2))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert contrastive_loss(a, a.clone(), t).item() == pytest.approx(want, rel=1e-6)
    # with one label for all, every other view is a positive: mean of their -log p
    p_partner = math.exp(1 / t) / (math.exp(1 / t) + 2)
    p_other = 1 / (math.exp(1 / t) + 2)
    want = -(math.log(p_partner) + 2 * math.log(p_other)) / 3
    assert contrastive_loss(a, a.clone(), t, torch.tensor([3, 3])).item() == pytest.approx(want, rel=1e-6)


def test_augment_keeps_shape_and_range_and_shifts_the_glyph():
    x = -torch.ones(64, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1
    v = augment(x, 3, torch.Generator().manual_seed(0))
    assert v.shape == x.shape and v.min() >= -1 and v.max() <= 1
    moved = 0
    for i in range(64):
        on = (v[i, 0] > 0).nonzero()
        assert len(on) >= 16 - 4 * 4 and ((on >= 6 - 3) & (on <= 9 + 3)).all()  # within max_shift of the square
        moved += bool(len(on)) and on.min(0).values.tolist() != [6, 6]
    assert moved > 32


def test_world_encoder_learns_the_digits_and_is_reproducible(tmp_path, digits):
    """A short training lowers the contrastive loss and its features tell held-out digits
    apart (5-NN), near their pixels' own score."""
    import json

    from patchflow.data import build_dataset

    recipe = WorldRecipe(steps=40, items=1024, batch_size=64, width=8, dim=32)
    a = WorldEncoder(train_world_encoder(digits, tmp_path / "a", recipe, progress=False))
    tiny = WorldRecipe(steps=2, items=64, batch_size=16, width=8, dim=16)
    b, c = (WorldEncoder(train_world_encoder(digits, tmp_path / n, tiny, progress=False)) for n in "bc")
    assert b.identity() == c.identity()  # same data and recipe: the same weights
    train, val = build_dataset(digits, "train"), build_dataset(digits, "val")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:1500].tolist()
    xt = torch.stack([train[i][0][:, 0] for i in pick])
    yt = torch.tensor([int(train[i][1]) for i in pick])
    xv = torch.stack([val[i][0][:, 0] for i in range(len(val))])
    yv = torch.tensor([int(val[i][1]) for i in range(len(val))])

    def knn(ft, fv):
        ft, fv = F.normalize(ft.flatten(1), dim=1), F.normalize(fv.flatten(1), dim=1)
        return (yt[(fv @ ft.T).topk(5, dim=1).indices].mode(1).values == yv).float().mean().item()

    pixels = knn(xt + 1, xv + 1)
    learned = knn(a.features(xt), a.features(xv))
    assert a.features(xt[:2]).shape == (2, 8, 8, 32)
    assert learned > 0.85 and pixels > 0.85, (learned, pixels)  # 10 classes: chance is 0.1
    meta = json.loads((tmp_path / "a" / "encoder.json").read_text())
    assert meta["final_loss"] < meta["first_loss"] - 0.15 and meta["recipe"]["steps"] == 40


def test_world_encoder_learns_a_colour_world_and_tells_numbers_apart(tmp_path):
    """On colour-digits images (colours permuted between views) the contrastive loss falls instead of sitting at
    log(2N - 1), the collapse the batch-normed head and the instance term prevent; numbers are their own classes."""
    import json
    import math

    from patchflow.data import build_dataset
    from patchflow.data.config import DataConfig
    from patchflow.vision.world import training_images

    cfg = DataConfig(dataset="color-digits")
    world = build_dataset(cfg, "train")
    kinds = {}
    for i in range(400):
        digits = world.attributes(i)["digits"]
        kinds.setdefault(len(digits), []).append((digits, world.glyph_class(i)))
    assert all(c == d[0] for d, c in kinds[1]) and all(c == 10 + 10 * d[0] + d[1] for d, c in kinds[2])
    _, labels = training_images(cfg, 256, 0)
    assert labels.max() >= 10  # numbers reach the encoder as their own classes, not as their first digit
    recipe = WorldRecipe(steps=30, items=512, batch_size=64, width=8, dim=32)
    train_world_encoder(cfg, tmp_path / "w", recipe, progress=False)
    meta = json.loads((tmp_path / "w" / "encoder.json").read_text())
    assert meta["first_loss"] > 2 * math.log(2 * 64 - 1) - 0.3  # instance + label term, both at chance
    assert meta["final_loss"] < meta["first_loss"] - 0.4, meta  # the collapsed head's loss did not move (< 0.01)


def test_patchflow_encoder_writes_a_directory_a_run_can_name(tmp_path, capsys):
    from patchflow.cli import main

    assert main(["encoder", "digits", "--out", str(tmp_path / "enc"), "--steps", "2", "--batch-size", "8",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f'repa.encoder = "{tmp_path / "enc"}"' in out
    meta = (tmp_path / "enc" / "encoder.json").read_text()
    assert '"steps": 2' in meta and '"batch_size": 8' in meta
    assert load_vision_encoder(str(tmp_path / "enc"), load_config("digits").data).dim == 128
    assert main(["encoder", "digits", "--out", str(tmp_path / "bad"), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # without --steps, the config's repa.world_steps: the encoder `repa.encoder = "world"` would train
    assert main(["encoder", "digits", "--out", str(tmp_path / "cfg"), "--batch-size", "8", "--quiet",
                 "--set", "repa.world_steps=3"]) == 0
    assert '"steps": 3' in (tmp_path / "cfg" / "encoder.json").read_text()


def test_world_steps_picks_the_cached_world_encoder_and_trains_it_once(tmp_path, digits, monkeypatch):
    import json

    from patchflow.checks import ConfigError
    from patchflow.vision.world import default_world_dir

    monkeypatch.setenv("PATCHFLOW_CACHE", str(tmp_path))
    encoder = load_vision_encoder("world", digits, progress=False, world_steps=2)
    directory = default_world_dir(digits, WorldRecipe(steps=2))
    assert directory != default_world_dir(digits) and directory.is_dir()  # another key than the 200-step default
    assert json.loads((directory / "encoder.json").read_text())["recipe"]["steps"] == 2
    stamp = (directory / "encoder.safetensors").stat().st_mtime_ns
    again = load_vision_encoder("world", digits, progress=False, world_steps=2)  # read from the cache, not retrained
    assert (directory / "encoder.safetensors").stat().st_mtime_ns == stamp
    assert again.identity() == encoder.identity()
    assert load_config("digits").repa.world_steps == 100  # the preset's
    with pytest.raises(ConfigError, match="repa.world_steps"):
        load_config("digits", ["repa.world_steps=0"])
