"""REPA / CREPA: the alignment terms against closed forms, the pooling of features to a token grid, the hidden
states every model kind hands its projector, and the config checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from patchflow.config import ConfigError, load_config
from patchflow.models import build_model
from patchflow.repa.loss import alignment, cross_frame_alignment, repa_loss, token_features
from patchflow.repa.projector import Projector
from patchflow.train.build import PROJECTOR, attach_projector, split_projector


def test_alignment_is_the_negative_mean_cosine():
    # two tokens: one pointing along its feature (cos 1), one at 60 degrees (cos 1/2): -(1 + 1/2) / 2
    projected = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    target = torch.tensor([[[5.0, 0.0], [0.5, math.sqrt(3) / 2]]])
    assert torch.allclose(alignment(projected, target), torch.tensor([-0.75]), atol=1e-6)
    assert torch.allclose(alignment(-projected, target), torch.tensor([0.75]), atol=1e-6)


def test_cross_frame_term_closed_form():
    # 3 frames of 1 token: cos(p_t, y_s) is 1 where s = t + 1 and 0 otherwise; window 1: pairs (t, t-1) and (t, t+1)
    # are 4, of which (0 -> 1) and (1 -> 2) score 1: mean 1/2, so the term is -1/2
    e = torch.eye(4)
    projected = torch.stack([e[1], e[2], e[3]])[None]  # frame t points at feature t + 1 (frame 2 at none)
    target = e[None, :3]
    assert torch.allclose(cross_frame_alignment(projected, target, frames=3, window=1), torch.tensor([-0.5]))
    # window 2 adds the distance-2 pairs (0, 2) and (2, 0), weight e^-2, both orthogonal: -(e^-1 * 1/2) / (e^-1 + e^-2)
    want = -(math.exp(-1) * 0.5) / (math.exp(-1) + math.exp(-2))
    assert torch.allclose(cross_frame_alignment(projected, target, frames=3, window=2), torch.tensor([want]))
    assert torch.equal(cross_frame_alignment(projected[:, :1], target[:, :1], frames=1), torch.zeros(1))


def test_token_features_pool_to_the_grid_in_patch_order():
    f = torch.arange(2 * 4 * 4 * 1, dtype=torch.float32).view(1, 2, 4, 4, 1)  # (B, T, h, w, D)
    out = token_features(f, (2, 2, 2))
    assert out.shape == (1, 8, 1)
    want = F.avg_pool3d(f.permute(0, 4, 1, 2, 3), (1, 2, 2)).flatten(2).transpose(1, 2)
    assert torch.equal(out, want)
    assert out[0, 0, 0] == (0 + 1 + 4 + 5) / 4 and out[0, 4, 0] == 16 + (0 + 1 + 4 + 5) / 4  # frame-major
    assert torch.equal(token_features(f, (1, 4, 4))[0, :, 0], f[0].mean(0).flatten())  # frames averaged


def test_repa_loss_adds_the_cross_frame_term_only_for_clips():
    g = torch.Generator().manual_seed(0)
    projected, features = torch.randn(2, 8, 3, generator=g), torch.randn(2, 2, 2, 2, 3, generator=g)
    target = token_features(features, (2, 2, 2))
    base = repa_loss(projected, features, (2, 2, 2))
    assert torch.allclose(base, alignment(projected, target))
    both = repa_loss(projected, features, (2, 2, 2), cross_frame=0.5)
    assert torch.allclose(both, base + 0.5 * cross_frame_alignment(projected, target, 2))
    with pytest.raises(ValueError, match="projected tokens"):
        repa_loss(projected[:, :4], features, (2, 2, 2))


TINY = {
    "dit": ["model.arch=\"dit\"", "model.hidden_size=32", "model.depth=3", "model.num_heads=2", "model.patch_size=4"],
    "mmdit": ["model.hidden_size=32", "model.depth=3", "model.num_heads=2", "model.text_dim=16",
              "model.pooled_dim=16"],
    "crossdit": ["model.arch=\"crossdit\"", "model.hidden_size=32", "model.depth=3", "model.num_heads=2",
                 "model.text_dim=16", "model.pooled_dim=16"],
    "video": ["model.hidden_size=32", "model.depth=3", "model.num_heads=2", "model.text_dim=16",
              "model.pooled_dim=16", "model.frames=2", "data.frames=2"],
}
PRESET = {"dit": "digits", "mmdit": "color-digits", "crossdit": "color-digits", "video": "moving-digits-image"}


def _inputs(cfg, b: int):
    m = cfg.model
    g = torch.Generator().manual_seed(1)
    if cfg.kind.prompts:
        x = torch.randn(b, m.in_channels, *((m.frames,) if cfg.kind.video else ()), m.input_size, m.input_size,
                        generator=g)
        return (x, torch.rand(b, generator=g) * 1000, torch.randn(b, 3, m.text_dim, generator=g),
                torch.randn(b, m.pooled_dim, generator=g))
    return (torch.randn(b, m.in_channels, m.input_size, m.input_size, generator=g),
            torch.rand(b, generator=g) * 1000, torch.zeros(b, dtype=torch.long))


@pytest.mark.parametrize("arch", list(TINY))
def test_every_model_kind_hands_its_projector_the_image_tokens_after_block_depth(arch):
    cfg = load_config(PRESET[arch], TINY[arch] + ["repa.encoder=\"world\"", "repa.depth=2"])
    torch.manual_seed(0)
    net = build_model(cfg.model)
    attach_projector(cfg, net, feature_dim=5)
    seen = []
    net.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    inputs = _inputs(cfg, 2)
    net.train()
    net(*inputs)
    tokens = seen[0]
    m = cfg.model
    n = (m.frames if cfg.kind.video else 1) * (m.input_size // m.patch_size) ** 2
    assert tokens.shape == (2, n, 32) and net.aligned.shape == (2, n, 5)
    assert torch.allclose(net.aligned, net.repa_projector(tokens))
    net.aligned = None
    with torch.no_grad():  # sampling never runs the projector
        net(*inputs)
    net.eval()
    net(*inputs)
    assert net.aligned is None
    own, projector = split_projector(net.state_dict())
    assert projector and all(k.startswith(PROJECTOR) for k in projector)
    assert own.keys() == build_model(cfg.model).state_dict().keys()  # what sampling and exports load, strictly


def test_projector_shapes():
    p = Projector(32, 7, width=16)
    assert p(torch.zeros(2, 5, 32)).shape == (2, 5, 7)
    assert [type(m).__name__ for m in p.net] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]


@pytest.mark.parametrize("sets, message", [
    (["repa.depth=7"], "repa.depth = 7 is beyond the model's 6 blocks"),
    (["repa.weight=-1"], "repa.weight must be >= 0"),
    (["repa.depth=0"], "repa.depth"),
    (["repa.cache=\" \""], "repa.cache must not be empty"),
])
def test_bad_repa_settings_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("color-digits", ["repa.encoder=\"world\""] + sets)


def test_repa_is_refused_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="codec run"):
        load_config("codec-digits", ["repa.encoder=\"world\""])
    with pytest.raises(ConfigError, match="train.pack_tokens"):
        load_config("moving-digits", ["repa.encoder=\"world\"", "train.pack_tokens=256", "data.buckets=[]"])
    assert not load_config("moving-digits").repa.enabled  # off unless asked for (the video stage's preset)
