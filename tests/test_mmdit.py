"""patchflow's MMDiT on its own: shapes, masks, positions, initialisation, gradients, checkpointing, compile.

Agreement with diffusers' SD3Transformer2DModel is tested in test_convert_sd3.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from patchflow.config import DataConfig, RunConfig
from patchflow.models import build_model
from patchflow.models.embed import CroppedPositions
from patchflow.models.mmdit import MMDiT
from patchflow.models.text_config import MMDiTConfig

from text_model_inputs import C, POOLED_DIM, TEXT_DIM, inputs, randomize


def tiny(**kw) -> MMDiTConfig:
    base = dict(input_size=8, in_channels=C, patch_size=2, hidden_size=16, depth=3, num_heads=2,
                text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, qk_norm=True, dual_attention_layers=[0],
                pos_embed_max_size=8)
    return MMDiTConfig(**{**base, **kw})


def test_fresh_model_outputs_zero_and_blocks_are_identities():
    model = MMDiT(tiny())
    x, t, text, pooled = inputs()
    assert torch.count_nonzero(model(x, t, text, pooled)) == 0  # zeroed final layer
    d = model.config.hidden_size
    tokens, words, c = torch.randn(3, 16, d), torch.randn(3, 5, d), torch.randn(3, d)
    for block in model.blocks:  # zeroed adaLN: every gate is 0, so each block passes both streams through
        out, out_text = block(tokens, words, c)
        assert torch.equal(out, tokens)
        assert out_text is None if block is model.blocks[-1] else torch.equal(out_text, words)


def test_shapes_ranks_and_aspect_ratios():
    model = randomize(MMDiT(tiny())).eval()
    x, t, text, pooled = inputs(height=8, width=12)
    with torch.no_grad():
        out4 = model(x, t, text, pooled)
        out5 = model(x[:, :, None], t, text, pooled)
    assert out4.shape == (3, C, 8, 12) and out5.shape == (3, C, 1, 8, 12)
    assert torch.equal(out5[:, :, 0], out4)
    assert out4.abs().mean() > 0.1  # a real output, not zeros


def test_last_block_is_context_pre_only():
    model = MMDiT(tiny(depth=3, dual_attention_layers=[0, 2]))
    last = model.blocks[-1]
    assert last.text_mlp is None and last.attn.text_proj is None
    assert last.attn.text_qkv.out_features == 2 * 16  # text keys and values only
    assert last.text_adaLN_modulation[-1].out_features == 2 * 16  # shift, scale
    assert [b.attn2 is not None for b in model.blocks] == [True, False, True]
    assert model.blocks[0].adaLN_modulation[-1].out_features == 9 * 16
    assert model.blocks[1].adaLN_modulation[-1].out_features == 6 * 16


def test_all_true_mask_equals_no_mask():
    model = randomize(MMDiT(tiny())).eval()
    x, t, text, pooled = inputs()
    with torch.no_grad():
        ref = model(x, t, text, pooled)
        for mask in (torch.ones(3, 5, dtype=torch.bool), torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5)):
            assert torch.equal(model(x, t, text, pooled, mask), ref)


def test_padded_and_masked_text_equals_unpadded():
    model = randomize(MMDiT(tiny())).eval()
    x, t, text, pooled = inputs(length=5)
    lengths = [5, 3, 1]
    junk = torch.randn(3, 4, TEXT_DIM) * 10  # padding tokens with content: only the mask keeps them out
    padded = torch.cat([text, junk], dim=1)
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    for i, n in enumerate(lengths):
        padded[i, n:5] = junk[i, 0]
    with torch.no_grad():
        out = model(x, t, padded, pooled, mask)
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], pooled[i:i + 1])
            torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        unmasked = model(x, t, padded, pooled)
    assert (unmasked - out).abs().max() > 1e-2  # without the mask the padding changes the image


def test_gradients_reach_every_parameter_of_both_streams():
    model = randomize(MMDiT(tiny()))
    x, t, text, pooled = inputs()
    model(x, t, text, pooled, torch.ones(3, 5, dtype=torch.bool)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing  # DDP needs every parameter used; both streams learn
    for p in (model.text_embedder.weight, model.blocks[-1].attn.text_qkv.weight, model.x_embedder.proj.weight):
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_same_gradients(every):
    x, t, text, pooled = inputs()
    mask = torch.arange(5)[None] < torch.tensor([5, 4, 2])[:, None]
    grads = []
    for k in (0, every):
        model = randomize(MMDiT(tiny()))
        model.checkpoint_every = k
        model(x, t, text, pooled, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def sd3_table(dim: int, table: int, grid: int, h: int, w: int) -> np.ndarray:
    """SD3's recipe written out in numpy: positions i * grid / table on a table x table grid, per token
    [1D(column), 1D(row)] with 1D = [sin, cos], then the centre crop of h x w."""
    pos = np.arange(table, dtype=np.float32) / np.float32(table / grid)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_d(p):
        out = np.outer(p.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(pos, pos, indexing="ij")
    full = np.concatenate([one_d(cols.ravel()), one_d(rows.ravel())], axis=1).reshape(table, table, dim)
    top, left = (table - h) // 2, (table - w) // 2
    return full[top:top + h, left:left + w].reshape(h * w, dim).astype(np.float32)


@pytest.mark.parametrize("table,grid,h,w", [(8, 4, 8, 8), (8, 4, 4, 4), (8, 4, 4, 6), (8, 4, 5, 3), (6, 6, 6, 2)])
def test_positions_are_the_centre_crop_of_sd3s_table(table, grid, h, w):
    got = CroppedPositions(16, table, grid)(h, w)[0].numpy()
    np.testing.assert_allclose(got, sd3_table(16, table, grid, h, w), atol=1e-6)


def test_default_table_is_twice_the_grid_and_too_large_inputs_raise():
    model = MMDiT(tiny(pos_embed_max_size=0))  # 0: twice the training grid of 4 patches
    assert model.pos_embed.table == 8
    x, t, text, pooled = inputs(height=16, width=16)
    assert model(x, t, text, pooled).shape == (3, C, 16, 16)
    with pytest.raises(ValueError, match=r"exceeds the position table of 8x8 patches .* at most 16x16"):
        model(*inputs(height=18, width=8))
    with pytest.raises(ValueError, match="pos_embed_max_size = 8"):
        model(*inputs(height=8, width=20))


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "x": a["x"][:, :3]}, r"x of shape \(B, 4, H, W\)"),
    (lambda a: {**a, "x": a["x"][:, :, :7]}, "not divisible by the patch size 2"),
    (lambda a: {**a, "x": a["x"][:, :, None].expand(-1, -1, 2, -1, -1)}, "must have 1 frame"),
    (lambda a: {**a, "t": a["t"][:2]}, r"t must have shape \(3,\)"),
    (lambda a: {**a, "text": a["text"][..., :5]}, r"text must have shape \(3, L, 12\)"),
    (lambda a: {**a, "pooled": a["pooled"][:, :4]}, r"pooled must have shape \(3, 10\)"),
    (lambda a: {**a, "text_mask": torch.ones(3, 4, dtype=torch.bool)}, r"text_mask must have shape \(3, 5\)"),
    (lambda a: {**a, "text_mask": torch.full((3, 5), -float("inf"))}, "bool or 0/1"),
])
def test_bad_inputs_are_named(change, match):
    model = MMDiT(tiny())
    x, t, text, pooled = inputs()
    with pytest.raises(ValueError, match=match):
        model(**change({"x": x, "t": t, "text": text, "pooled": pooled}))


def test_config_checks_and_build_model_dispatch():
    with pytest.raises(ValueError, match="frames must be 1"):
        MMDiT(tiny(frames=2))
    with pytest.raises(ValueError, match="arch = 'mmdit'"):
        MMDiT(tiny(arch="crossdit", dual_attention_layers=[]))
    cfg = RunConfig(model=tiny(), data=DataConfig(dataset="color-digits")).validate()
    assert isinstance(build_model(cfg.model), MMDiT)


def test_bf16_autocast_stays_close_to_fp32():
    model = randomize(MMDiT(tiny()), std=0.1).eval()
    x, t, text, pooled = inputs()
    mask = torch.arange(5)[None] < torch.tensor([5, 4, 2])[:, None]
    with torch.no_grad():
        ref = model(x, t, text, pooled, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, text, pooled, mask)
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert low.dtype == torch.bfloat16 and err < 0.05


def test_compiled_blocks_match_eager_across_shapes():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = randomize(MMDiT(tiny())).eval()
    def masked(batch, height, width, length, seed):
        mask = torch.arange(length)[None] < torch.arange(batch)[:, None] + 1  # row i has i + 1 real tokens
        return *inputs(batch, height, width, length, seed), mask

    cases = [inputs(2, 8, 8, 5, seed=1), inputs(2, 12, 8, 7, seed=2), inputs(3, 8, 16, 3, seed=3),
             masked(2, 8, 8, 5, seed=4), masked(3, 8, 12, 6, seed=5)]
    with torch.no_grad():
        eager = [model(*a) for a in cases]
        model.compile_blocks(backend="aot_eager")  # the graph capture is what is tested, not inductor's kernels
        graphs = []
        for a, ref in zip(cases, eager):
            torch.testing.assert_close(model(*a), ref, atol=1e-5, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    # new sizes, prompt lengths and batches reuse the graphs; a mask is a second variant, compiled once
    assert graphs[0] >= 1 and graphs[2] == graphs[0] and graphs[3] > graphs[2] and graphs[4] == graphs[3]
