"""patchflow's codecs: the interface, the image and causal video autoencoders, codec directories, codec runs."""
import json

import pytest
import torch

from patchflow import codecs
from patchflow.codecs import CodecError, IdentityCodec
from patchflow.codecs.autoencoder import AutoencoderConfig, KLAutoencoder
from patchflow.train.codec_model import AutoencoderModel

SMALL = dict(channels=[8, 16, 16], latent_channels=3)


def codec(td=1, in_channels=3, **kw):
    torch.manual_seed(0)
    return KLAutoencoder(AutoencoderConfig(in_channels=in_channels, time_downsample=td, **{**SMALL, **kw})).eval()


@pytest.mark.parametrize("td,frames", [(1, [1, 2, 3, 8]), (2, [1, 3, 5, 9]), (4, [1, 5, 9])])
@pytest.mark.parametrize("size", [(8, 8), (16, 24), (32, 32)])
def test_encode_decode_shapes_for_every_accepted_size(td, frames, size):
    c = codec(td)
    h, w = size
    z = c.encode(torch.rand(2, 3, h, w) * 2 - 1)  # an image
    assert z.shape == (2, 3, h // 4, w // 4) == c.latent_shape((2, 3, h, w))
    assert c.decode(z).shape == (2, 3, h, w)
    for t in frames:
        x = torch.rand(1, 3, t, h, w) * 2 - 1
        z = c.encode(x)
        lt = t if td == 1 else 1 + (t - 1) // td
        assert z.shape == (1, 3, lt, h // 4, w // 4) == c.latent_shape(x.shape)
        assert c.decode(z).shape == x.shape == c.pixel_shape(z.shape)


@pytest.mark.parametrize("td,bad", [(2, [2, 4, 8]), (4, [2, 3, 4, 7, 8])])
def test_frame_counts_a_causal_codec_cannot_take_are_refused(td, bad):
    c = codec(td)
    for t in bad:
        with pytest.raises(CodecError, match=rf"compresses time by {td}: a clip needs 1 \+ {td} \* k frames"):
            c.encode(torch.zeros(1, 3, t, 8, 8))


def test_sizes_and_channels_a_codec_cannot_take_are_refused():
    c = codec()
    with pytest.raises(CodecError, match=r"multiples of 4, got 30x32; resize or crop to e.g. 28x32"):
        c.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(CodecError, match=r"takes 3-channel pixels, got 1 channels"):
        c.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(CodecError, match=r"has 3 latent channels"):
        c.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(CodecError, match=r"images \(B, C, H, W\) or clips"):
        c.encode(torch.zeros(3, 32, 32))


@pytest.mark.parametrize("td", [2, 4])
def test_causal_video_codec_encodes_a_one_frame_clip_like_its_image_path(td):
    c = codec(td)
    torch.manual_seed(1)
    clip = torch.rand(2, 3, 1 + 2 * td, 16, 16) * 2 - 1
    image = clip[:, :, 0]
    z_image = c.encode(image)
    z_one = c.encode(clip[:, :, :1])
    z_clip = c.encode(clip)
    torch.testing.assert_close(z_one[:, :, 0], z_image, rtol=0, atol=0)
    # latent frame 0 depends on pixel frame 0 only: the later frames change nothing in it
    torch.testing.assert_close(z_clip[:, :, 0], z_image, rtol=1e-5, atol=1e-5)
    other = clip.clone()
    other[:, :, 1:] = torch.rand_like(other[:, :, 1:])
    z_other = c.encode(other)
    torch.testing.assert_close(z_other[:, :, 0], z_clip[:, :, 0], rtol=1e-5, atol=1e-5)
    assert (z_other[:, :, 1:] - z_clip[:, :, 1:]).abs().max() > 1e-3  # ...and the later latents do see them
    # decoding is causal too: pixel frame 0 comes from latent frame 0 alone
    x_clip, x_one = c.decode(z_clip), c.decode(z_clip[:, :, :1])
    torch.testing.assert_close(x_clip[:, :, 0], x_one[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.decode(z_image), x_one[:, :, 0], rtol=1e-5, atol=1e-5)


def test_image_codec_codes_frames_independently():
    c = codec()
    clip = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    z = c.encode(clip)
    for t in range(4):
        torch.testing.assert_close(z[:, :, t], c.encode(clip[:, :, t]), rtol=1e-5, atol=1e-6)


def test_scale_and_shift_normalise_the_posterior_mode_and_round_trip():
    c = codec()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, _ = c.encode_moments(x.unsqueeze(2))
    shift, scale = [0.5, -1.0, 2.0], [2.0, 0.5, 4.0]
    c.set_latent_stats(shift, scale)
    z = c.encode(x)
    want = (mean.squeeze(2) - torch.tensor(shift)[:, None, None]) * torch.tensor(scale)[:, None, None]
    torch.testing.assert_close(z, want)
    torch.testing.assert_close(c.denormalize(c.normalize(mean)), mean)
    torch.testing.assert_close(c.decode(z), c.decode_raw(mean).squeeze(2))
    c.set_latent_stats(0.25, 3.0)  # one value for every channel
    torch.testing.assert_close(c.encode(x), (mean.squeeze(2) - 0.25) * 3.0)
    with pytest.raises(CodecError, match="one number or one per latent channel"):
        c.set_latent_stats([0.0, 1.0], 1.0)


def test_encode_samples_only_when_given_a_generator():
    c = codec()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(c.encode(x), c.encode(x))  # the mode
    a, b = c.encode(x, generator=torch.Generator().manual_seed(3)), c.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c.encode(x))
    mean, std = c.encode_distribution(x)
    torch.testing.assert_close(mean, c.encode(x))
    assert (std > 0).all()


def test_identity_codec_is_exactly_the_pixels():
    c = codecs.load("identity")
    x = torch.rand(2, 3, 5, 8, 8)
    assert torch.equal(c.encode(x), x) and torch.equal(c.decode(x), x)
    assert torch.equal(c.encode(x, generator=torch.Generator().manual_seed(0)), x)
    assert isinstance(c, IdentityCodec) and c.latent_shape((2, 1, 32, 32)) == (2, 1, 32, 32)


def test_codec_directory_round_trip_and_identity(tmp_path):
    c = codec(2)
    c.set_latent_stats([0.1, 0.2, 0.3], [1.5, 2.5, 3.5])
    codecs.save(c, tmp_path / "c", extra={"note": "x"})
    back = codecs.load(tmp_path / "c")
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(back.encode(x), c.encode(x))
    assert back.identity() == c.identity()
    assert back.causal and back.time_factor == 2 and back.space_factor == 4
    changed = codec(2)
    changed.set_latent_stats([0.1, 0.2, 0.3], [1.5, 2.5, 3.5])
    with torch.no_grad():
        changed.decoder.conv_out.weight.add_(1e-3)
    assert changed.identity()["sha256"] != c.identity()["sha256"]


def test_bad_codec_directories_are_clear_errors(tmp_path):
    with pytest.raises(CodecError, match="not found: give 'identity', a shipped codec preset"):
        codecs.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="is not a codec directory"):
        codecs.load(tmp_path / "empty")
    codecs.save(codec(), tmp_path / "c")
    (tmp_path / "c" / "codec.safetensors").unlink()
    with pytest.raises(CodecError, match=r"incomplete: codec.safetensors missing"):
        codecs.load(tmp_path / "c")
    codecs.save(codec(), tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "codec.json").read_text())
    del meta["config"]
    (tmp_path / "d" / "codec.json").write_text(json.dumps(meta))
    with pytest.raises(CodecError, match="lacks the key 'config'"):
        codecs.load(tmp_path / "d")
    (tmp_path / "d" / "codec.json").write_text("{not json")
    with pytest.raises(CodecError, match="not readable JSON"):
        codecs.load(tmp_path / "d")


def test_autoencoder_training_terms_and_adversarial_term_trains_only_what_it_should():
    torch.manual_seed(0)
    cfg = AutoencoderConfig(in_channels=1, adversarial_weight=0.5, disc_channels=8, **SMALL)
    model = AutoencoderModel(cfg)
    x = torch.rand(2, 1, 1, 16, 16) * 2 - 1
    noise = torch.randn(2, 3, 1, 4, 4)
    terms = model(x, noise)
    assert set(terms) == {"l1", "mse", "kl", "generator", "discriminator"}
    assert all(v.shape == (2,) for v in terms.values())
    # the generator's term reaches the codec but not the discriminator
    terms["generator"].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.discriminator.parameters())
    assert model.codec.decoder.conv_out.weight.grad.abs().max() > 0
    model.zero_grad()
    model(x, noise)["discriminator"].sum().backward()
    assert model.codec.decoder.conv_out.weight.grad is None or model.codec.decoder.conv_out.weight.grad.abs().max() == 0
    assert model.discriminator.net[0].weight.grad.abs().max() > 0
    # the KL term is KL(N(mean, var) || N(0, I)) summed over latent values, per pixel value
    with torch.no_grad():
        mean, logvar = model.codec.encode_moments(x)
        want = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1) / x[0].numel()
        torch.testing.assert_close(model(x, noise)["kl"], want)
        torch.testing.assert_close(model(x, noise)["l1"], (model.codec.decode_raw(mean + (0.5 * logvar).exp() * noise)
                                                          - x).abs().flatten(1).mean(1))


def test_a_video_codec_inflated_from_an_image_codec_codes_a_still_clip_like_the_image_codec():
    image = codec(1)
    video = KLAutoencoder(AutoencoderConfig(in_channels=3, time_downsample=2, **SMALL)).eval()
    video.inflate_from(image)
    still = (torch.rand(2, 3, 16, 16) * 2 - 1).unsqueeze(2).expand(-1, -1, 5, -1, -1).contiguous()
    z_video, z_image = video.encode(still), image.encode(still[:, :, 0])
    assert z_video.shape == (2, 3, 3, 4, 4)
    for t in range(3):  # every latent frame of a still clip is the image codec's latent
        torch.testing.assert_close(z_video[:, :, t], z_image, rtol=1e-5, atol=1e-5)
    x_video, x_image = video.decode(z_video), image.decode(z_image)
    for t in range(5):
        torch.testing.assert_close(x_video[:, :, t], x_image, rtol=1e-4, atol=1e-5)
    moving = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # frames differ: the pairs are averaged, not equal any more
    assert (video.encode(moving)[:, :, 1] - image.encode(moving[:, :, 1])).abs().max() > 1e-3
    with pytest.raises(ValueError, match="same in_channels, latent_channels, channels, blocks"):
        video.inflate_from(codec(1, latent_channels=4))
    with pytest.raises(ValueError, match="must be an image codec"):
        video.inflate_from(codec(2))
