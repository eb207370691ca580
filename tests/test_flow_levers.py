"""The video-identity levers of [flow] and the codec: PYoCo frame noise, contrastive flow matching, the codec's
shift-equivariance term, each against a closed form."""
import math

import pytest
import torch

from patchflow.checks import ConfigError
from patchflow.flow import rectified
from patchflow.flow.config import FlowConfig
from patchflow.flow.noise import correlate_frames, frame_noise
from patchflow.flow.objective import draw_noise
from patchflow.train.codec_model import equivariance_error, shift


@pytest.mark.parametrize("mode,alpha,corr", [("mixed", 1.0, [0.5, 0.5, 0.5]), ("mixed", 2.0, [0.8, 0.8, 0.8]),
                                             ("progressive", 1.0, [0.5 ** 0.5, 0.5, 0.5 ** 1.5])])
def test_frame_noise_keeps_unit_variance_and_correlates_frames_as_the_closed_form(mode, alpha, corr):
    g = torch.Generator().manual_seed(0)
    e = frame_noise((6000, 1, 4, 2, 2), mode, alpha, lambda s: torch.randn(s, generator=g))
    f = e.permute(2, 0, 1, 3, 4).flatten(1)  # (T, samples)
    assert torch.allclose(f.std(1), torch.ones(4), atol=0.03)
    assert torch.allclose(torch.corrcoef(f)[0, 1:], torch.tensor(corr), atol=0.03)


def test_independent_noise_is_the_plain_draw_and_images_are_untouched():
    x0 = torch.zeros(3, 2, 4, 4, 4)
    plain = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    got = draw_noise(x0, FlowConfig(), torch.Generator().manual_seed(5), (0, 1))
    assert torch.equal(got, plain)  # runs without frame noise draw exactly what they always drew
    image = torch.randn(2, 3, 1, 4, 4)
    assert torch.equal(correlate_frames(image, "mixed", 1.0, torch.randn(2, 3, 1, 4, 4)), image)
    with pytest.raises(ValueError, match="shared draw"):
        correlate_frames(torch.randn(1, 1, 2, 2, 2), "mixed", 1.0)


def test_contrastive_flow_loss_against_its_closed_form():
    g = torch.Generator().manual_seed(1)
    x0, noise, t = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, generator=g)
    pred = torch.randn(3, 2, 4, 4, generator=g)
    target = noise - x0
    want = (pred - target).pow(2).flatten(1).mean(1) - 0.05 * (pred - target[[2, 0, 1]]).pow(2).flatten(1).mean(1)
    got = rectified.flow_loss(lambda x, s: pred, x0, noise, t, contrast=0.05)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(rectified.flow_loss(lambda x, s: pred, x0, noise, t), (pred - target).pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("key,value,match", [("frame_noise", "pyoco", "flow.frame_noise"),
                                             ("contrastive", 1.0, "flow.contrastive"),
                                             ("frame_noise_alpha", -1.0, "frame_noise_alpha")])
def test_bad_lever_settings_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        FlowConfig(**{key: value}).validate()
    with pytest.raises(ConfigError, match="rectified-flow"):
        FlowConfig(objective="ddpm", contrastive=0.05).validate()


def test_fractional_shift_and_the_equivariance_error():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(shift(x, 1, 0), x.roll(1, dims=-2))
    assert torch.allclose(shift(x, 0, 0.25), 0.75 * x + 0.25 * x.roll(1, dims=-1))
    assert torch.allclose(shift(x, -0.5, 0), 0.5 * x.roll(-1, dims=-2) + 0.5 * x)
    img = torch.randn(2, 3, 1, 8, 8)
    identity = lambda v: v  # noqa: E731 - exactly equivariant at factor 1
    assert torch.allclose(equivariance_error(identity, img, img, 1, -1, 1), torch.zeros(2), atol=1e-6)
    pool = lambda v: torch.nn.functional.avg_pool3d(v, (1, 2, 2))  # noqa: E731 - only equivariant on its grid
    mean = pool(img)
    assert torch.allclose(equivariance_error(pool, img, mean, 2, 0, 2), torch.zeros(2), atol=1e-6)
    off = equivariance_error(pool, img, mean, 1, 0, 2)
    assert (off > 0.05).all() and math.isfinite(float(off.sum()))


def test_codec_objective_adds_the_equivariance_term_only_when_weighted():
    from patchflow.codecs.autoencoder import AutoencoderConfig
    from patchflow.train.codec_model import AutoencoderModel, AutoencoderObjective

    torch.manual_seed(0)
    x = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    seen, same = {}, AutoencoderModel(AutoencoderConfig(channels=[8, 8], latent_channels=2)).state_dict()
    for weight in (0.0, 1.0):
        cfg = AutoencoderConfig(channels=[8, 8], latent_channels=2, equivariance_weight=weight)
        cfg.validate()
        model = AutoencoderModel(cfg)
        model.load_state_dict(same)

        def fn(*inputs):
            seen[weight] = model(*inputs)
            return seen[weight]

        loss = AutoencoderObjective(cfg).loss(fn, x, torch.Generator().manual_seed(3))
        assert loss.shape == (2,)
        seen[weight, "loss"] = loss
    assert "equivariance" not in seen[0.0] and (seen[1.0]["equivariance"] > 0).all()
    assert torch.allclose(seen[1.0, "loss"] - seen[0.0, "loss"], seen[1.0]["equivariance"], atol=1e-5)
    with pytest.raises(ValueError, match="equivariance_weight"):
        AutoencoderConfig(equivariance_weight=-1).validate()
