import pytest
import torch

from patchflow.models.crossdit import CrossDiT
from patchflow.models.dit import DiT, DiTConfig
from patchflow.models.embed import patchify, sincos_3d, timestep_frequencies, unpatchify
from patchflow.models.mmdit import MMDiT
from patchflow.models.text_config import MMDiTConfig, VideoDiTConfig
from patchflow.models.video import VideoDiT


def tiny(**kw):
    base = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    return DiTConfig(**{**base, **kw})


def randomize(model):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 4, 4), (1, 1, 1)])
def test_patchify_roundtrip(patch):
    x = torch.randn(2, 3, 4, 8, 8)
    grid = (4 // patch[0], 8 // patch[1], 8 // patch[2])
    tokens = patchify(x, patch)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * patch[0] * patch[1] * patch[2])
    # patchify orders (c, pt, ph, pw) like a conv weight; unpatchify expects channel-last (pt, ph, pw, c)
    back = unpatchify(tokens.unflatten(-1, (3, -1)).transpose(-1, -2).flatten(-2), grid, patch)
    assert torch.equal(back, x)


def test_patch_embed_equals_strided_conv():
    model = randomize(DiT(tiny()))
    x = torch.randn(2, 3, 8, 8)
    w = model.x_embedder.proj.weight.reshape(32, 3, 2, 2)
    conv = torch.nn.functional.conv2d(x, w, model.x_embedder.proj.bias, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.x_embedder(x[:, :, None]), conv, atol=1e-5, rtol=1e-5)


def test_forward_shapes_image_and_video():
    model = randomize(DiT(tiny(learn_sigma=True)))
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.tensor([0.0, 999.0]), torch.tensor([0, 5])  # 5 is the null class
    out4 = model(x, t, y)
    assert out4.shape == (2, 6, 8, 8)
    out5 = model(x[:, :, None], t, y)
    assert out5.shape == (2, 6, 1, 8, 8)
    torch.testing.assert_close(out5[:, :, 0], out4)
    assert model(torch.randn(2, 3, 3, 8, 12), t, y).shape == (2, 6, 3, 8, 12)  # frames and aspect ratio


def test_zero_init_outputs_zero():
    model = DiT(tiny())
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: output layer starts at zero


def test_sincos_table_matches_dit_recipe():
    import numpy as np

    d, h, w = 16, 3, 5
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))

    def one(pos):
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ref = np.concatenate([one(cols.ravel()), one(rows.ravel())], axis=1)
    np.testing.assert_allclose(sincos_3d(d, (1, h, w)).numpy(), ref, atol=1e-6)
    video = sincos_3d(d, (2, h, w))
    assert not torch.allclose(video[: h * w], video[h * w:])  # frames are told apart


def test_timestep_frequencies():
    f = timestep_frequencies(256)
    assert f[0] == 1 and torch.isclose(f[-1], torch.tensor(10000 ** (-127 / 128)))
    f1 = timestep_frequencies(256, freq_shift=1)
    assert torch.isclose(f1[-1], torch.tensor(1e-4))


def test_label_dropout_is_drawn_for_the_global_batch():
    from patchflow.flow.guidance import drop_labels

    y = torch.zeros(4000, dtype=torch.long)
    full = drop_labels(y, null=5, prob=0.3, generator=torch.Generator().manual_seed(0))
    assert 0.27 < (full == 5).float().mean() < 0.33 and set(full.tolist()) <= {0, 5}
    # two processes with half the batch each drop exactly what one process drops
    halves = [drop_labels(y[:2000], 5, 0.3, torch.Generator().manual_seed(0), shard=(r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full)
    assert torch.equal(drop_labels(y, 5, 0.0), y)


def test_model_output_does_not_depend_on_train_mode():
    model = randomize(DiT(tiny(class_dropout_prob=0.5)))
    x, t, y = torch.randn(4, 3, 8, 8), torch.full((4,), 10.0), torch.tensor([0, 1, 2, 5])
    torch.testing.assert_close(model.train()(x, t, y), model.eval()(x, t, y))


@pytest.mark.parametrize("name,depth,hidden,heads,official", [("DiT-S/2", 12, 384, 6, 33.0e6),
                                                              ("DiT-XL/2", 28, 1152, 16, 675_129_632)])
def test_paper_presets(name, depth, hidden, heads, official):
    cfg = DiTConfig.from_preset(name, input_size=32, in_channels=4, learn_sigma=True)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (depth, hidden, heads)
    with torch.device("meta"):
        model = DiT(cfg)
    # the official count includes the fixed (256, hidden) pos_embed, which patchflow computes instead
    n = sum(p.numel() for p in model.parameters()) + 256 * hidden
    assert abs(n - official) / official < 2e-3


@pytest.mark.parametrize("kw,msg", [(dict(patch_size=3), "does not divide model.input_size"),
                                    (dict(num_heads=5), "does not divide model.hidden_size"),
                                    (dict(depth=0), "model.depth must be >= 1")])
def test_impossible_shapes_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DiT(tiny(**kw))


def test_bad_input_shape_message():
    model = DiT(tiny())
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 3"):
        model(torch.randn(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(2, 3, 7, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def graphs_per_case(model, cases, **compile_kwargs) -> list[int]:
    """Run each case (a tuple of forward arguments) eagerly, compile the blocks, run them again: the outputs must
    match. Returns the number of distinct graphs compiled so far after each compiled case."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = [model(*a) for a in cases]
    model.compile_blocks(**compile_kwargs)
    graphs = []
    for a, ref in zip(cases, eager):
        torch.testing.assert_close(model(*a), ref, atol=1e-5, rtol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert model.compiled
    return graphs


def test_compiled_blocks_match_eager_without_recompiling_per_shape():
    model = randomize(DiT(tiny())).eval()
    shapes = [(2, 3, 1, 8, 8), (2, 3, 1, 16, 16), (2, 3, 1, 8, 24), (5, 3, 1, 16, 16), (3, 3, 2, 8, 12)]
    inputs = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    graphs = graphs_per_case(model, [(x, torch.full((x.shape[0],), 3.0), torch.zeros(x.shape[0], dtype=torch.long))
                                     for x in inputs])
    # the first shape compiles; new resolutions, batch sizes and frame counts reuse it (a token count that
    # happens to equal a static width, e.g. 32 tokens at hidden 32, costs one extra compile)
    assert graphs[0] >= 1 and graphs[-1] == graphs[1]


def checkpointing_case(arch):
    """(a 3-block model, every weight random, and a forward on fixed inputs) for each checkpointed architecture."""
    g = torch.Generator().manual_seed(0)
    if arch == "dit":
        model, x = randomize(DiT(tiny(depth=3))), torch.randn(2, 3, 8, 8, generator=g)
        return model, lambda: model(x, torch.tensor([3.0, 700.0]), torch.tensor([1, 5]))
    sizes = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=4, text_dim=12,
                 pooled_dim=10)
    text, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([[5], [3]])  # padding: the masked attention path
    if arch == "video":  # factorized: temporal blocks between the joint ones; one timestep per frame
        model = randomize(VideoDiT(VideoDiTConfig(**sizes, frames=2, attention="factorized")))
        x, t = torch.randn(2, 4, 2, 8, 8, generator=g), torch.tensor([[0.0, 500.0], [900.0, 900.0]])
    else:
        model = randomize({"mmdit": MMDiT, "crossdit": CrossDiT}[arch](MMDiTConfig(arch=arch, **sizes)))
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20.0, 800.0])
    return model, lambda: model(x, t, text, pooled, mask)


@pytest.mark.parametrize("arch", ["dit", "mmdit", "crossdit", "video"])
def test_activation_checkpointing_recomputes_every_kth_block_and_changes_no_number(arch):
    model, forward = checkpointing_case(arch)
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):  # a checkpointed block starts twice: in forward, again in backward
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    runs = {}
    for every in (0, 1, 2):
        model.checkpoint_every, calls[:] = every, [0] * len(calls)
        model.zero_grad()
        out = forward()
        out.square().mean().backward()
        assert calls == [2 if every and i % every == 0 else 1 for i in range(len(calls))], every
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        runs[every] = out.detach(), grads
    ref, ref_grads = runs[0]
    assert sum(int(g.count_nonzero()) for g in ref_grads) > 0
    for every in (1, 2):
        out, grads = runs[every]
        assert torch.equal(out, ref), every
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no autograd, nothing to save: no block is recomputed
        calls[:] = [0] * len(calls)
        assert torch.equal(forward(), ref) and calls == [1] * len(calls)


def test_video_compiled_blocks_match_eager_without_recompiling_per_shape():
    """VideoDiT marks its blocks' batch, token and text dims dynamic too (the shared BlockRunner)."""
    model = randomize(VideoDiT(VideoDiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2,
                                              num_heads=4, text_dim=12, pooled_dim=10, frames=2))).eval()
    g = torch.Generator().manual_seed(0)
    # batch, height, width, prompt length: token counts (48, 72, 64) unlike any static width
    cases = [(2, 8, 12, 5), (3, 12, 12, 7), (2, 16, 8, 6), (4, 8, 12, 5)]
    args = [(torch.randn(b, 4, 2, h, w, generator=g), torch.rand(b, generator=g) * 1000,
             torch.randn(b, n, 12, generator=g), torch.randn(b, 10, generator=g)) for b, h, w, n in cases]
    with torch.no_grad():  # aot_eager: the graph capture is what is tested, not inductor's kernels
        graphs = graphs_per_case(model, args, backend="aot_eager")
    assert graphs[0] >= 1 and graphs[-1] == graphs[0]


@pytest.mark.parametrize("keys", [16, 64])
def test_short_bf16_training_attention_runs_in_fp32_and_sampling_runs_as_given(keys):
    from patchflow.models.attention import SHORT_KEYS, sdpa

    sdpa_ref = torch.nn.functional.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, keys, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, keys, keys, generator=g) > 0.2
    mask[..., 0] = True  # every query sees a key
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v, mask)
    assert keys <= SHORT_KEYS and out.dtype == torch.bfloat16
    assert torch.equal(out, sdpa_ref(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16())
    exact = sdpa_ref(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding of the result
    out.float().square().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # sampling: PyTorch's call on bf16 inputs
        assert torch.equal(sdpa(q, k, v, mask), sdpa_ref(q, k, v, attn_mask=mask))
