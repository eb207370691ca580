"""VideoDiT: tubelets, 3D positions, full and factorized attention, packing, per-frame timesteps, loading an image
MMDiT, and the flow's given frames and SDEdit."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchflow.config import FlowConfig
from patchflow.flow import rectified
from patchflow.flow.objective import RectifiedFlowObjective
from patchflow.models.embed import patchify, unpatchify
from patchflow.models.mmdit import MMDiT
from patchflow.models.spacetime import rope_angles, rotate, temporal_sincos
from patchflow.models.text_config import MMDiTConfig, VideoDiTConfig
from patchflow.models.video import VideoDiT, load_image_weights

SIZES = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=4, text_dim=16,
             pooled_dim=8)


def randomized(model):
    """Every weight random (the zero inits would hide the temporal layers and the modulation)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def video(**kw):
    return randomized(VideoDiT(VideoDiTConfig(**{**SIZES, "frames": 4, **kw})))


def text_inputs(b, length=5):
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    if b > 2:
        mask[2, 1:] = False
    return torch.randn(b, length, 16, generator=g), torch.randn(b, 8, generator=g), mask


@settings(max_examples=25, deadline=None)
@given(pt=st.integers(1, 3), ph=st.integers(1, 4), pw=st.integers(1, 4), t=st.integers(1, 3), h=st.integers(1, 3),
       w=st.integers(1, 3), c=st.integers(1, 3))
def test_patchify_unpatchify_round_trip_for_any_divisible_size(pt, ph, pw, t, h, w, c):
    x = torch.randn(2, c, t * pt, h * ph, w * pw)
    tokens = patchify(x, (pt, ph, pw))
    assert tokens.shape == (2, t * h * w, c * pt * ph * pw)
    assert torch.equal(unpatchify(patchify(x, (pt, ph, pw)).unflatten(-1, (c, pt, ph, pw)).permute(0, 1, 3, 4, 5, 2)
                                  .flatten(2), (t, h, w), (pt, ph, pw)), x)


@pytest.mark.parametrize("attention,positions,block", [
    ("full", "sincos", False), ("full", "rope", False), ("factorized", "sincos", False),
    ("factorized", "rope", False), ("factorized", "sincos", True),  # flex_attention block masks (CUDA's path)
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention without compile on CPU: the unfused reference
def test_a_packed_batch_gives_each_sample_its_own_output(attention, positions, block):
    model = video(attention=attention, positions=positions)
    model.block_masks = block
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g),
          torch.randn(4, 2, 8, 12, generator=g), torch.randn(4, 4, 6, 6, generator=g)]
    ts = [torch.tensor(500.0), torch.tensor(20.0), torch.tensor([100.0, 900.0]), torch.tensor([0.0, 300, 300, 300])]
    text, pooled, mask = text_inputs(4)
    with torch.no_grad():
        packed = model(xs, ts, text, pooled, mask)
        for i, x in enumerate(xs):
            t = ts[i].reshape(1, -1) if ts[i].ndim else ts[i].reshape(1)
            alone = model(x[None], t, text[i:i + 1], pooled[i:i + 1], mask[i:i + 1])[0]
            assert packed[i].shape == x.shape
            torch.testing.assert_close(packed[i], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_an_image_mmdit_checkpoint_gives_the_same_output_on_one_frame(attention):
    image = randomized(MMDiT(MMDiTConfig(**SIZES)))
    model = VideoDiT(VideoDiTConfig(**SIZES, frames=4, attention=attention))
    left = load_image_weights(model, image.state_dict())
    assert all(k.startswith("temporal_blocks.") for k in left) and bool(left) == (attention == "factorized")
    x, t = torch.randn(3, 4, 1, 8, 8), torch.tensor([10.0, 500.0, 990.0])
    text, pooled, mask = text_inputs(3)
    with torch.no_grad():
        # equal up to the attention kernel's rounding (the video model takes the math kernel for short sequences)
        torch.testing.assert_close(model.eval()(x, t, text, pooled, mask), image.eval()(x, t, text, pooled, mask),
                                   atol=2e-6, rtol=1e-5)
        clip = model(torch.randn(3, 4, 4, 8, 8), t, text, pooled, mask)  # and it runs on clips
    assert clip.shape == (3, 4, 4, 8, 8) and torch.isfinite(clip).all()


def test_image_weights_spread_over_tubelets_embed_a_still_clip_as_the_image():
    image = randomized(MMDiT(MMDiTConfig(**SIZES)))
    model = VideoDiT(VideoDiTConfig(**SIZES, frames=4, temporal_patch=2))
    load_image_weights(model, image.state_dict())
    frame = torch.randn(2, 4, 8, 8)
    still = frame[:, :, None].expand(-1, -1, 2, -1, -1)
    torch.testing.assert_close(model.x_embedder(still), image.x_embedder(frame[:, :, None]), atol=1e-5, rtol=1e-5)
    tokens, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    out = unpatchify(model.final_layer(tokens, c), (1, 4, 4), (2, 2, 2))
    one = unpatchify(image.final_layer(tokens, c), (1, 4, 4), (1, 2, 2))
    assert torch.equal(out[:, :, :1], one) and torch.equal(out[:, :, 1:], one)


def test_temporal_blocks_start_as_the_identity_and_frame_zero_has_no_temporal_code():
    from patchflow.models.spacetime import Layout

    fresh = VideoDiT(VideoDiTConfig(**SIZES, frames=4, attention="factorized"))
    tokens, layout = torch.randn(2, 4 * 16, 64), Layout(index=None, text_c=None, frames=(4, 16))
    assert all(torch.equal(b(tokens, torch.randn(2, 64), layout), tokens) for b in fresh.temporal_blocks)
    codes = temporal_sincos(64, 5)
    assert torch.equal(codes[0], torch.zeros(64)) and codes[1:].abs().sum(1).min() > 0


def test_per_frame_timesteps_equal_to_one_timestep_give_the_same_output_and_differ_otherwise():
    model = video()
    x = torch.randn(2, 4, 4, 8, 8)
    text, pooled, mask = text_inputs(2)
    with torch.no_grad():
        one = model(x, torch.tensor([300.0, 700.0]), text, pooled, mask)
        per = model(x, torch.tensor([[300.0] * 4, [700.0] * 4]), text, pooled, mask)
        mixed = model(x, torch.tensor([[0.0, 300, 300, 300], [700.0] * 4]), text, pooled, mask)
    assert torch.equal(one, per)
    assert not torch.allclose(mixed[0], one[0]) and torch.allclose(mixed[1], one[1], atol=1e-5)


def test_rope_rotations_keep_norms_and_depend_on_offsets_only():
    angles = rope_angles(16, (3, 4, 4))
    q, k = torch.randn(1, 48, 1, 16), torch.randn(1, 48, 1, 16)
    rq = rotate(q, angles)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    same_q, same_k = q[:, :1].expand(1, 48, 1, 16), k[:, :1].expand(1, 48, 1, 16)
    dots = (rotate(same_q, angles)[0, :, 0] @ rotate(same_k, angles)[0, :, 0].T)
    # token (t, i, j) against (t + 1, i, j): the same offset everywhere gives the same score
    a = torch.arange(32)
    torch.testing.assert_close(dots[a, a + 16], dots[0, 16].expand(32), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad,message", [
    (torch.randn(1, 4, 3, 8, 8), "must divide frames"),
    (torch.randn(1, 4, 4, 7, 8), "must divide frames, height and width"),
    (torch.randn(1, 3, 4, 8, 8), "4 channels"),
    (torch.randn(1, 4, 8, 8), r"\(B, C, T, H, W\)"),
    (torch.randn(1, 4, 4, 40, 8), "exceeds the position table"),
])
def test_bad_clip_shapes_are_errors_that_say_what_fits(bad, message):
    model = VideoDiT(VideoDiTConfig(**SIZES, frames=4, temporal_patch=2))
    text, pooled, mask = text_inputs(1)
    with pytest.raises(ValueError, match=message):
        model(bad, torch.tensor([1.0]), text, pooled, mask)


def test_config_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="temporal_patch=3 does not divide model.frames=4"):
        VideoDiTConfig(**SIZES, frames=4, temporal_patch=3).validate()
    with pytest.raises(ValueError, match="model.attention"):
        VideoDiTConfig(**SIZES, attention="axial").validate()
    with pytest.raises(ValueError, match="dual_attention"):
        VideoDiTConfig(**SIZES, dual_attention_layers=[0]).validate()


# ---- the flow with given frames, and SDEdit ----------------------------------------------------------------
def test_given_frames_stay_fixed_while_sampling_and_the_rest_moves():
    obj = RectifiedFlowObjective(FlowConfig(shift=3.0))
    known = torch.randn(2, 4, 5, 8, 8)
    given = torch.tensor([[True, False, False, False, False], [True, True, True, False, False]])
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.sin(x) + t[:, None, :, None, None] / 1000  # any velocity field with per-frame times

    out = obj.sample(model_fn, torch.randn(2, 4, 5, 8, 8), 6, context=(known, given))
    assert torch.equal(out[0, :, :1], known[0, :, :1]) and torch.equal(out[1, :, :3], known[1, :, :3])
    assert not torch.allclose(out[0, :, 1:], known[0, :, 1:])
    assert all(t.shape == (2, 5) and bool((t[given] == 0).all()) and bool((t[~given] > 0).all()) for t in seen)


def test_sdedit_starts_part_way_and_strength_one_ignores_the_clip():
    obj = RectifiedFlowObjective(FlowConfig(shift=1.0))
    init, noise = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    calls = []

    def model_fn(x, t):
        calls.append(float(t[0]))
        return noise - init  # the exact velocity from init to noise: the ODE returns to init

    out = obj.sample(model_fn, noise, 10, init=init, strength=0.3)
    assert len(calls) == 3 and calls[0] == pytest.approx(300.0)
    torch.testing.assert_close(out, init, atol=1e-5, rtol=1e-5)
    calls.clear()
    obj.sample(model_fn, noise, 10, init=init, strength=1.0)
    assert len(calls) == 10 and calls[0] == pytest.approx(1000.0)


def test_training_loss_with_given_frames_ignores_the_model_there():
    x0, noise, t = torch.randn(3, 4, 4, 8, 8), torch.randn(3, 4, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    given = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    target = noise - x0

    def perfect_but_wrong_on_given(x, tf):
        out = target.clone()
        out[given[:, None, :, None, None].expand_as(out)] = 99.0
        xt = (1 - tf[:, None, :, None, None]) * x0 + tf[:, None, :, None, None] * noise
        assert torch.allclose(x, xt) and torch.equal(tf[given], torch.zeros(int(given.sum())))
        return out

    loss = rectified.context_flow_loss(perfect_but_wrong_on_given, x0, noise, t, given)
    assert torch.equal(loss, torch.zeros(3))


def test_context_draws_leading_frames_for_the_asked_share_of_clips():
    obj = RectifiedFlowObjective(FlowConfig(context_prob=0.4))
    x0 = torch.zeros(4000, 1, 6, 1, 1)
    given = obj._context(x0, torch.Generator().manual_seed(0), (0, 1))
    count = given.sum(1)
    assert abs((count > 0).float().mean().item() - 0.4) < 0.03
    assert bool((given[:, 1:] <= given[:, :-1]).all())  # leading frames only
    assert count.max() == 5 and abs((count == 1).float().sum() / (count > 0).float().sum() - 0.6) < 0.05
