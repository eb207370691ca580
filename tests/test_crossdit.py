"""patchflow's CrossDiT (PixArt-alpha with cross-attention): shapes, masks, positions, initialisation, gradients,
activation checkpointing, compile and parameter count."""
from __future__ import annotations

import pytest
import torch

from patchflow.config import DataConfig, RunConfig
from patchflow.models import build_model
from patchflow.models.crossdit import CrossDiT
from patchflow.models.embed import CroppedPositions, sincos_1d
from patchflow.models.text_config import MMDiTConfig

from text_model_inputs import C, POOLED_DIM, TEXT_DIM, inputs, randomize


def tiny(**kw) -> MMDiTConfig:
    base = dict(arch="crossdit", input_size=8, in_channels=C, patch_size=2, hidden_size=16, depth=3, num_heads=2,
                text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, qk_norm=True, pos_embed_max_size=8)
    return MMDiTConfig(**{**base, **kw})


def test_fresh_model_outputs_zero_and_blocks_are_identities():
    torch.manual_seed(0)
    model = CrossDiT(tiny())
    x, t, text, pooled = inputs()
    assert torch.count_nonzero(model(x, t, text, pooled)) == 0  # zeroed final Linear
    d = model.config.hidden_size
    tokens, words, c = torch.randn(3, 16, d), torch.randn(3, 5, d), torch.randn(3, d)
    modulation = model.t_block(c)
    assert torch.count_nonzero(modulation) == 0  # adaLN-single starts at zero ...
    for block in model.blocks:  # ... so the gates are the tables' zero rows, and the cross projection is zero
        assert torch.count_nonzero(block.scale_shift_table[[2, 5]]) == 0
        assert torch.count_nonzero(block.scale_shift_table[[0, 1, 3, 4]]) == 4 * d
        assert torch.equal(block(tokens, words, modulation), tokens)
    # PixArt's tables: N(0, 1/D); a seeded build is reproducible
    torch.manual_seed(0)
    again = CrossDiT(tiny())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    table = torch.cat([b.scale_shift_table[[0, 1, 3, 4]] for b in model.blocks]).flatten()
    assert 0.5 < table.std().item() * d ** 0.5 < 1.5


def test_shapes_ranks_and_aspect_ratios():
    model = randomize(CrossDiT(tiny())).eval()
    with torch.no_grad():
        for height, width in [(8, 8), (8, 12), (16, 4), (2, 16)]:  # all within the 8x8-patch table
            x, t, text, pooled = inputs(height=height, width=width)
            out4 = model(x, t, text, pooled)
            out5 = model(x[:, :, None], t, text, pooled)
            assert out4.shape == (3, C, height, width) and out5.shape == (3, C, 1, height, width)
            torch.testing.assert_close(out5[:, :, 0], out4, atol=0, rtol=0)
            assert torch.isfinite(out4).all() and out4.abs().mean() > 1e-3


def test_gradients_reach_the_final_layer_first_then_every_parameter():
    torch.manual_seed(0)
    model = CrossDiT(tiny())
    x, t, text, pooled = inputs()
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1])[:, None]
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = dict(model.named_parameters())
    reached = []
    for _ in range(3):
        opt.zero_grad()
        ((model(x, t, text, pooled, mask) - target) ** 2).mean().backward()
        reached.append({n for n, p in names.items() if p.grad is not None and p.grad.abs().max() > 0})
        opt.step()
    # step 0: everything before the zeroed final Linear gets exactly zero gradient
    assert reached[0] == {"final_layer.linear.weight", "final_layer.linear.bias"}
    # step 1: the gates (adaLN-single, tables), the cross-attention output projections, the embeddings
    for n in ("t_block.1.weight", "blocks.0.scale_shift_table", "blocks.2.cross_attn.proj.weight",
              "final_layer.scale_shift_table", "x_embedder.proj.weight", "pooled_embedder.0.weight",
              "t_embedder.mlp.0.weight"):
        assert n in reached[1], n
    assert "blocks.0.attn.qkv.weight" not in reached[1] and "caption_projection.fc1.weight" not in reached[1]
    # step 2: every parameter, the text path included
    assert reached[2] == set(names)


def test_all_true_mask_equals_no_mask():
    model = randomize(CrossDiT(tiny())).eval()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        ref = model(x, t, text, pooled)
        assert torch.equal(model(x, t, text, pooled, torch.ones(3, 5, dtype=torch.bool)), ref)
        assert torch.equal(model(x, t, text, pooled, torch.ones(3, 5, dtype=torch.long)), ref)


def test_padded_and_masked_text_equals_unpadded():
    model = randomize(CrossDiT(tiny())).eval()
    x, t, text, pooled = inputs(length=6)
    lengths = [6, 4, 1]
    garbage = torch.randn(3, 6, TEXT_DIM) * 100  # padding holds anything; the mask must hide it
    keep = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    padded = torch.where(keep[..., None], text, garbage)
    with torch.no_grad():
        together = model(x, t, padded, pooled, keep)
        together_int = model(x, t, padded, pooled, keep.float())  # 0/1 masks are accepted
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], pooled[i:i + 1])
            torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        unmasked = model(x, t, padded, pooled)
    assert torch.equal(together_int, together)
    assert (unmasked[1:] - together[1:]).abs().max() > 1e-2  # the padding would matter without the mask


def test_output_depends_on_text_pooled_and_time_per_sample():
    model = randomize(CrossDiT(tiny())).eval()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        ref = model(x, t, text, pooled)
        other_text = text.clone()
        other_text[0] = torch.randn(5, TEXT_DIM)
        out = model(x, t, other_text, pooled)
        assert (out[0] - ref[0]).abs().max() > 1e-2
        torch.testing.assert_close(out[1:], ref[1:], atol=1e-6, rtol=0)  # no leak across the batch
        other_pooled = pooled.clone()
        other_pooled[1] += 1
        out = model(x, t, text, other_pooled)
        assert (out[1] - ref[1]).abs().max() > 1e-2 and torch.equal(out[0], ref[0])
        assert (model(x, t + 100, text, pooled) - ref).abs().max() > 1e-2
        # the text reaches the image only through the cross-attention
        for block in model.blocks:
            block.cross_attn.proj.weight.zero_()
            block.cross_attn.proj.bias.zero_()
        torch.testing.assert_close(model(x, t, other_text, pooled), model(x, t, text, pooled), atol=0, rtol=0)


def test_positions_are_the_centre_crop_of_the_table():
    table = CroppedPositions(16, table=8, grid=4)
    full = table(8, 8).reshape(8, 8, 16)
    # table patch i sits at i * grid / table; columns in the first half, rows in the second
    expected = sincos_1d(8, torch.arange(8) * 0.5).float()
    torch.testing.assert_close(full[0, :, :8], expected)
    torch.testing.assert_close(full[:, 0, 8:], expected)
    for h, w in [(4, 4), (3, 8), (8, 1), (5, 6)]:
        top, left = (8 - h) // 2, (8 - w) // 2
        assert torch.equal(table(h, w).reshape(h, w, 16), full[top:top + h, left:left + w])
    assert CrossDiT(tiny(pos_embed_max_size=0)).pos_embed.table == 8  # 0 = twice the 4-patch training grid


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "x": torch.randn(3, C, 18, 8)}, r"at most 16x16"),  # 9 patches > the table of 8
    (lambda a: {**a, "x": torch.randn(3, C, 8, 7)}, "not divisible by the patch size"),
    (lambda a: {**a, "x": torch.randn(3, C + 1, 8, 8)}, r"expects x of shape \(B, 4"),
    (lambda a: {**a, "x": torch.randn(3, C, 2, 8, 8)}, "must have 1 frame"),
    (lambda a: {**a, "t": torch.rand(2)}, r"t must have shape \(3,\)"),
    (lambda a: {**a, "text": torch.randn(3, 5, TEXT_DIM + 1)}, "model.text_dim = 12"),
    (lambda a: {**a, "text": torch.randn(3, 0, TEXT_DIM)}, "at least one token"),
    (lambda a: {**a, "pooled": torch.randn(3, POOLED_DIM + 1)}, "model.pooled_dim = 10"),
    (lambda a: {**a, "text_mask": torch.ones(3, 4, dtype=torch.bool)}, r"text_mask must have shape \(3, 5\)"),
    (lambda a: {**a, "text_mask": torch.zeros(3, 5).masked_fill(torch.ones(3, 5, dtype=torch.bool), -1e9)},
     "additive mask"),
    (lambda a: {**a, "text_mask": torch.arange(5)[None] < torch.tensor([5, 0, 2])[:, None]}, "no real token"),
])
def test_bad_inputs_are_named(change, match):
    model = CrossDiT(tiny())
    x, t, text, pooled = inputs()
    args = change({"x": x, "t": t, "text": text, "pooled": pooled, "text_mask": None})
    with pytest.raises(ValueError, match=match):
        model(**args)


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_output_and_gradients(every):
    model = randomize(CrossDiT(tiny()))
    x, t, text, pooled = inputs()
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 2])[:, None]

    def run():
        model.zero_grad()
        out = model(x, t, text, pooled, mask)
        (out ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_grads = run()
    model.checkpoint_every = every
    out, grads = run()
    assert torch.equal(out, ref)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5, msg=n)
        assert g.abs().max() > 0, n


def test_config_checks_and_build_model_dispatch():
    with pytest.raises(ValueError, match="arch = 'crossdit'"):
        CrossDiT(tiny(arch="mmdit"))
    with pytest.raises(ValueError, match="frames must be 1"):
        CrossDiT(tiny(frames=2))
    with pytest.raises(ValueError, match="dual_attention_layers"):
        CrossDiT(tiny(dual_attention_layers=[0]))
    cfg = RunConfig(model=tiny(), data=DataConfig(dataset="color-digits")).validate()
    model = build_model(cfg.model)
    assert isinstance(model, CrossDiT) and isinstance(model.blocks, torch.nn.ModuleList)


def test_parameter_count_per_block_and_total():
    """Per block: self-attention 4D^2 + 4D, cross-attention 4D^2 + 4D, MLP 8D^2 + 5D, table 6D, QK norms 4 hd."""
    cfg = tiny(hidden_size=256, depth=6, num_heads=4, text_dim=384, pooled_dim=384)
    model = CrossDiT(cfg)
    d, hd = 256, 64
    per_block = 16 * d * d + 19 * d + 4 * hd
    assert all(sum(p.numel() for p in b.parameters()) == per_block for b in model.blocks)
    stem = (C * 4 * d + d) + (256 * d + d + d * d + d) + (384 * d + d + d * d + d) + (384 * d + d + d * d + d)
    adaln_single, final = d * 6 * d + 6 * d, 2 * d + d * 4 * C + 4 * C
    assert sum(p.numel() for p in model.parameters()) == stem + 6 * per_block + adaln_single + final == 7_186_192


def test_bf16_autocast_stays_close_to_fp32():
    model = randomize(CrossDiT(tiny()), std=0.1).eval()
    x, t, text, pooled = inputs()
    mask = torch.arange(5)[None] < torch.tensor([5, 4, 2])[:, None]
    with torch.no_grad():
        ref = model(x, t, text, pooled, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, text, pooled, mask)
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert low.dtype == torch.bfloat16 and err < 0.05


def test_compiled_blocks_match_eager_across_shapes():
    torch._dynamo.reset()
    model = randomize(CrossDiT(tiny())).eval()
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]
    cases = [inputs(2, 8, 8, 5, seed=1), inputs(3, 12, 8, 7, seed=2), (*inputs(3, 8, 16, 6, seed=3), mask)]
    with torch.no_grad():
        eager = [model(*a) for a in cases]
        model.compile_blocks(backend="aot_eager")  # the graph capture is what is tested, not inductor's kernels
        for a, ref in zip(cases, eager):
            torch.testing.assert_close(model(*a), ref, atol=1e-5, rtol=1e-5)
    assert model.compiled
