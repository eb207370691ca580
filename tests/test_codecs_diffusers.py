"""diffusers autoencoders behind the codec interface: the same numbers as diffusers itself, on tiny random models.

Each model is built with a fixed seed, saved with `save_pretrained` into a temporary directory and loaded back
through `patchflow.codecs.load`; every output is compared with diffusers' own call on the model that was saved,
with the pipelines' normalisation written out here: `(z - shift) * scale` (AutoencoderKL) or
`(z - latents_mean) / latents_std` per channel (Wan).
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from torch.testing import assert_close

from patchflow.codecs import CodecError, load

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, AutoencoderKLWan  # noqa: E402

from patchflow.codecs.diffusers import DiffusersAutoencoderKL, DiffusersWanVAE, load_diffusers_vae  # noqa: E402

TIGHT = dict(atol=1e-6, rtol=1e-5)  # the same float32 ops in the same order: at most rounding apart

KL_STYLES = {  # config overrides, expected (shift, scale)
    "sd": (dict(latent_channels=4), (0.0, 0.18215)),
    "sd3": (dict(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                 use_post_quant_conv=False), (0.0609, 1.5305)),
}
WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 2.0, 0.5, 1.0]


def tiny_kl(seed=0, **overrides) -> AutoencoderKL:
    """2 levels (space factor 2), 32-pixel sample_size (diffusers' default tile: 32 pixels, 16 latents)."""
    torch.manual_seed(seed)
    kw = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return AutoencoderKL(**{**kw, **overrides}).eval()


def tiny_wan(seed=0) -> AutoencoderKLWan:
    """4 levels (space factor 8), time downsampled twice (factor 4), 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=WAN_MEAN,
                            latents_std=WAN_STD).eval()


def pixels(*shape, seed=1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(*shape, seed=2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from threads, and spinning threads slow to a crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kl_models(tmp_path_factory):
    """style -> (directory, the diffusers model saved there)."""
    out = {}
    for style, (overrides, _) in KL_STYLES.items():
        vae = tiny_kl(**overrides)
        d = tmp_path_factory.mktemp(style)
        vae.save_pretrained(d)
        out[style] = (d, vae)
    return out


@pytest.fixture(scope="module")
def wan_model(tmp_path_factory):
    vae = tiny_wan()
    d = tmp_path_factory.mktemp("wan")
    vae.save_pretrained(d)
    return d, vae


# ---- AutoencoderKL ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", list(KL_STYLES))
def test_kl_images_match_diffusers(kl_models, style):
    d, vae = kl_models[style]
    shift, scale = KL_STYLES[style][1]
    codec = load(str(d))
    assert isinstance(codec, DiffusersAutoencoderKL) and codec.kind == "diffusers-kl"
    c = vae.config.latent_channels
    assert (codec.in_channels, codec.latent_channels, codec.space_factor, codec.time_factor) == (3, c, 2, 1)
    assert not codec.causal and not codec.training
    assert_close(codec.latent_shift, torch.full((c,), shift))  # read from config.json, not defaults
    assert_close(codec.latent_scale, torch.full((c,), scale))

    x = pixels(2, 3, 16, 16)
    z = codec.encode(x)
    assert z.shape == (2, c, 8, 8)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert_close(z, (posterior.mode() - shift) * scale, **TIGHT)
        mean, std = codec.encode_distribution(x)
        assert_close(mean, z, **TIGHT)
        assert_close(std, posterior.std * scale, **TIGHT)

        zn = latents(2, c, 8, 8)
        y = codec.decode(zn)
        assert y.shape == (2, 3, 16, 16)
        assert_close(y, vae.decode(zn / scale + shift).sample, **TIGHT)


@pytest.mark.parametrize("style", list(KL_STYLES))
def test_kl_clips_are_coded_frame_by_frame(kl_models, style):
    d, vae = kl_models[style]
    shift, scale = KL_STYLES[style][1]
    codec = load(str(d))
    c = vae.config.latent_channels
    x = pixels(2, 3, 3, 16, 16)
    z = codec.encode(x)
    assert z.shape == (2, c, 3, 8, 8)
    zn = latents(2, c, 3, 8, 8)
    y = codec.decode(zn)
    assert y.shape == (2, 3, 3, 16, 16)
    with torch.no_grad():
        for t in range(3):  # each frame alone, through diffusers and through the codec's image path
            assert_close(z[:, :, t], (vae.encode(x[:, :, t]).latent_dist.mode() - shift) * scale, **TIGHT)
            assert_close(z[:, :, t], codec.encode(x[:, :, t]), **TIGHT)
            assert_close(y[:, :, t], vae.decode(zn[:, :, t] / scale + shift).sample, **TIGHT)


def test_kl_sampling_with_a_generator(kl_models):
    d, vae = kl_models["sd"]
    codec = load(str(d))
    x = pixels(2, 3, 16, 16)
    mode = codec.encode(x)
    a = codec.encode(x, generator=torch.Generator().manual_seed(7))
    b = codec.encode(x, generator=torch.Generator().manual_seed(7))
    other = codec.encode(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)  # reproducible for one seed
    assert not torch.allclose(a, mode, atol=1e-3) and not torch.allclose(a, other, atol=1e-3)
    # an image's noise has diffusers' shape and order, so the draw is diffusers' own sample for that seed
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert_close(a, ref * 0.18215, **TIGHT)


def test_kl_config_and_identity(kl_models, tmp_path):
    (sd_dir, _), (sd3_dir, _) = kl_models["sd"], kl_models["sd3"]
    sd, sd3 = load(str(sd_dir)), load(str(sd3_dir))
    cfg = sd.config_dict()
    assert cfg["class_name"] == "AutoencoderKL" and cfg["config"]["block_out_channels"] == [8, 16]
    assert json.loads(json.dumps(cfg)) == cfg and not any(k.startswith("_") for k in cfg["config"])
    assert sd.identity() == load(str(sd_dir)).identity()
    assert sd.identity()["sha256"] != sd3.identity()["sha256"]
    tiny_kl(seed=1, latent_channels=4).save_pretrained(tmp_path / "reseeded")  # same config, other weights
    assert load(str(tmp_path / "reseeded")).identity()["sha256"] != sd.identity()["sha256"]
    copy = tmp_path / "copy"  # the load path is no part of the identity
    shutil.copytree(sd_dir, copy)
    assert load(str(copy)).identity() == sd.identity()


def test_kl_per_channel_latents_mean_std(tmp_path):
    """SDXL-style configs normalise per channel: (z - latents_mean) * scaling_factor / latents_std."""
    mean, std = [0.5, -0.5, 0.25, 0.0], [2.0, 1.0, 0.5, 4.0]
    vae = tiny_kl(latent_channels=4, latents_mean=mean, latents_std=std, scaling_factor=0.5)
    vae.save_pretrained(tmp_path)
    codec = load(str(tmp_path))
    assert_close(codec.latent_shift, torch.tensor(mean))
    assert_close(codec.latent_scale, 0.5 / torch.tensor(std))
    x = pixels(1, 3, 16, 16)
    with torch.no_grad():
        ref = (vae.encode(x).latent_dist.mode() - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5 / torch.tensor(std).view(
            1, 4, 1, 1)
    assert_close(codec.encode(x), ref, **TIGHT)


# ---- tiled decoding --------------------------------------------------------------------------------------------
def test_kl_tiled_decode_is_diffusers_tiling(kl_models):
    d, vae = kl_models["sd"]
    plain, tiled = load(str(d)), load_diffusers_vae(d, tiled=True)
    zn = latents(1, 4, 40, 40)  # 80x80 pixels: 2x2 tiles of 16 latents (diffusers' default for sample_size 32)
    ref_z = zn / 0.18215
    try:
        vae.enable_tiling()
        with torch.no_grad():
            ref = vae.decode(ref_z).sample
    finally:
        vae.disable_tiling()
    y = tiled.decode(zn)
    assert_close(y, ref, **TIGHT)
    untiled = plain.decode(zn)
    assert (y - untiled).abs().max() > 1e-3  # tiling happened (GroupNorm statistics differ per tile)
    # the top-left tile is never blended into: it is that tile's latent decoded on its own
    with torch.no_grad():
        alone = vae.decode(ref_z[..., :16, :16]).sample
    assert_close(y[..., :24, :24], alone[..., :24, :24], **TIGHT)
    # a latent within one tile is not tiled
    small = latents(1, 4, 16, 16)
    assert_close(tiled.decode(small), plain.decode(small), **TIGHT)
    # encoding is never tiled: the same latents (and identity) as the untiled codec, even for a large image
    big = pixels(1, 3, 80, 80)
    assert torch.equal(tiled.encode(big), plain.encode(big))
    assert tiled.identity() == plain.identity()


def test_kl_tile_size_and_overlap(kl_models):
    d, _ = kl_models["sd"]
    zn = latents(1, 4, 40, 40)
    untiled = load(str(d)).decode(zn)

    def err(codec):
        return (codec.decode(zn) - untiled).abs().mean().item()

    # tile_size 16: the same as diffusers' tiling for a model whose sample_size is 16
    ref_vae = AutoencoderKL.from_pretrained(d, sample_size=16, local_files_only=True)
    ref_vae.enable_tiling()
    with torch.no_grad():
        ref = ref_vae.decode(zn / 0.18215).sample
    assert_close(load_diffusers_vae(d, tiled=True, tile_size=16).decode(zn), ref, **TIGHT)
    # blending overlapping tiles is what keeps tiles close to the untiled decode: seams without it
    blended, hard = err(load_diffusers_vae(d, tiled=True)), err(load_diffusers_vae(d, tiled=True, tile_overlap=0.0))
    assert blended < 0.6 * hard
    assert blended < 0.25 * untiled.abs().mean().item()
    with pytest.raises(CodecError, match="multiple of 2"):
        load_diffusers_vae(d, tiled=True, tile_size=17)
    with pytest.raises(CodecError, match="tile_overlap"):
        load_diffusers_vae(d, tiled=True, tile_overlap=1.0)


# ---- Wan ---------------------------------------------------------------------------------------------------------
def test_wan_shapes_and_normalisation(wan_model):
    d, _ = wan_model
    codec = load(str(d))
    assert isinstance(codec, DiffusersWanVAE) and codec.kind == "diffusers-wan"
    assert (codec.in_channels, codec.latent_channels, codec.time_factor, codec.space_factor) == (3, 4, 4, 8)
    assert codec.causal
    assert_close(codec.latent_shift, torch.tensor(WAN_MEAN))
    assert_close(codec.latent_scale, 1 / torch.tensor(WAN_STD))
    for frames, latent_frames in ((1, 1), (5, 2), (9, 3)):
        x = pixels(1, 3, frames, 16, 24)
        z = codec.encode(x)
        assert z.shape == codec.latent_shape(x.shape) == (1, 4, latent_frames, 2, 3)
        assert codec.decode(z).shape == x.shape
    assert codec.encode(pixels(2, 3, 16, 16)).shape == (2, 4, 2, 2)  # an image is a one-frame clip
    assert codec.decode(latents(2, 4, 2, 2)).shape == (2, 3, 16, 16)


def test_wan_matches_diffusers(wan_model):
    d, vae = wan_model
    codec = load(str(d))
    mean, std = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1), torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    x = pixels(2, 3, 5, 16, 16)
    zn = latents(2, 4, 2, 2, 2)
    with torch.no_grad():
        assert_close(codec.encode(x), (vae.encode(x).latent_dist.mode() - mean) / std, **TIGHT)
        assert_close(codec.decode(zn), vae.decode(zn * std + mean).sample, **TIGHT)
    a = codec.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, codec.encode(x, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, codec.encode(x), atol=1e-3)


def test_wan_is_causal(wan_model):
    """The first frame is encoded (and decoded) before, and without, the rest: only the final 1x1x1 convolution
    runs over all frames at once, so a longer clip's first latent frame matches up to float rounding (~1e-7),
    not bit for bit."""
    codec = load(str(wan_model[0]))
    x = pixels(1, 3, 9, 16, 16)
    z = codec.encode(x)
    assert_close(codec.encode(x[:, :, :1]), z[:, :, :1], atol=1e-5, rtol=1e-5)
    assert_close(codec.encode(x[:, :, :5]), z[:, :, :2], atol=1e-5, rtol=1e-5)
    y = codec.decode(z)
    assert_close(codec.decode(z[:, :, :1]), y[:, :, :1], atol=1e-5, rtol=1e-5)
    later = x.clone()
    later[:, :, 1:] = pixels(1, 3, 8, 16, 16, seed=9)  # other later frames: the first latent frame stays
    assert_close(codec.encode(later)[:, :, :1], z[:, :, :1], atol=1e-5, rtol=1e-5)


def test_wan_refuses_frame_counts_off_the_rule(wan_model):
    codec = load(str(wan_model[0]))
    with pytest.raises(CodecError, match=r"1 \+ 4 \* k frames .*got 4"):
        codec.encode(pixels(1, 3, 4, 16, 16))
    with pytest.raises(CodecError, match="multiples of 8"):
        codec.encode(pixels(1, 3, 5, 12, 16))


def test_wan_factors_from_config_or_layers(wan_model, tmp_path):
    d, _ = wan_model
    config = json.loads((d / "config.json").read_text())

    def variant(name, **changes):
        out = tmp_path / name
        shutil.copytree(d, out)
        cfg = {k: v for k, v in config.items() if k not in ("scale_factor_temporal", "scale_factor_spatial")}
        (out / "config.json").write_text(json.dumps({**cfg, **changes}))
        return out

    # an older config.json without scale_factor_*: the factors come from temperal_downsample and the levels
    old = load(str(variant("old")))
    assert (old.time_factor, old.space_factor) == (4, 8)
    with pytest.raises(CodecError, match="compresses time by 4 and space by 16.*compress by 4 and 8"):
        load(str(variant("wrong", scale_factor_spatial=16)))
    with pytest.raises(CodecError, match="chunks of 4"):
        load(str(variant("time2", temperal_downsample=[False, False, True], scale_factor_temporal=2)))


def test_wan22_style_patchified(tmp_path):
    """Wan 2.2's VAE patchifies 2x2 pixels first: config in_channels 12 is 3 pixel channels, space factor 16."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True,
                           temperal_downsample=[False, True, True], latents_mean=WAN_MEAN, latents_std=WAN_STD,
                           patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16).eval()
    vae.save_pretrained(tmp_path)
    codec = load(str(tmp_path))
    assert (codec.in_channels, codec.time_factor, codec.space_factor) == (3, 4, 16)
    x = pixels(1, 3, 5, 16, 16)
    z = codec.encode(x)
    assert z.shape == (1, 4, 2, 1, 1)
    mean, std = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1), torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        assert_close(z, (vae.encode(x).latent_dist.mode() - mean) / std, **TIGHT)
        assert_close(codec.decode(z), vae.decode(z * std + mean).sample, **TIGHT)


def test_wan_tiled_decode_is_diffusers_tiling(wan_model):
    d, vae = wan_model
    tiled = load_diffusers_vae(d, tiled=True, tile_size=16)  # 2-latent tiles; 0.25 overlap -> stride 8 pixels
    zn = latents(1, 4, 2, 4, 4)
    std, mean = torch.tensor(WAN_STD).view(1, 4, 1, 1, 1), torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1)
    ref_vae = AutoencoderKLWan.from_pretrained(d, local_files_only=True)
    ref_vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                          tile_sample_stride_width=8)
    with torch.no_grad():
        ref = ref_vae.decode(zn * std + mean).sample
    y = tiled.decode(zn)
    assert_close(y, ref, **TIGHT)
    assert (y - load(str(d)).decode(zn)).abs().max() > 1e-4  # tiling happened
    x = pixels(1, 3, 5, 32, 32)
    assert torch.equal(tiled.encode(x), load(str(d)).encode(x))  # encoding is never tiled


# ---- loading -----------------------------------------------------------------------------------------------------
def test_pipeline_folder_loads_its_vae(tmp_path, kl_models, wan_model):
    d, vae = kl_models["sd3"]
    pipe = tmp_path / "pipe"
    shutil.copytree(d, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    codec = load(str(pipe))
    assert isinstance(codec, DiffusersAutoencoderKL) and codec.latent_channels == 16
    x = pixels(1, 3, 16, 16)
    with torch.no_grad():
        assert_close(codec.encode(x), (vae.encode(x).latent_dist.mode() - 0.0609) * 1.5305, **TIGHT)
    wan_pipe = tmp_path / "wan_pipe"
    shutil.copytree(wan_model[0], wan_pipe / "vae")
    assert isinstance(load_diffusers_vae(wan_pipe), DiffusersWanVAE)


def test_load_errors(tmp_path, kl_models):
    sd_dir, sd3_dir = kl_models["sd"][0], kl_models["sd3"][0]
    with pytest.raises(CodecError, match="does not exist"):
        load_diffusers_vae(tmp_path / "nowhere")
    with pytest.raises(CodecError, match="not found"):
        load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="no config.json"):
        load_diffusers_vae(tmp_path / "empty")
    with pytest.raises(CodecError, match="config.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(CodecError, match="is a file"):
        load_diffusers_vae(sd_dir / "config.json")

    bad = tmp_path / "bad_json"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CodecError, match="not readable JSON"):
        load(str(bad))

    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CodecError, match="'UNet2DConditionModel'.*not a supported.*AutoencoderKL, AutoencoderKLWan"):
        load(str(unet))
    (unet / "config.json").write_text(json.dumps({"in_channels": 3}))
    with pytest.raises(CodecError, match="no _class_name"):
        load(str(unet))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(sd_dir / "config.json", no_weights)
    with pytest.raises(CodecError, match="no weights file diffusion_pytorch_model.safetensors"):
        load(str(no_weights))
    (no_weights / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CodecError, match="only pickled weights .*diffusion_pytorch_model.bin"):
        load(str(no_weights))

    mismatched = tmp_path / "mismatched"  # SD3's config with SD's weights
    mismatched.mkdir()
    shutil.copy(sd3_dir / "config.json", mismatched)
    shutil.copy(sd_dir / "diffusion_pytorch_model.safetensors", mismatched)
    with pytest.raises(CodecError, match="could not load the AutoencoderKL"):
        load(str(mismatched))


def test_diffusers_not_installed(kl_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(CodecError, match="pip install diffusers"):
        load(str(kl_models["sd"][0]))
