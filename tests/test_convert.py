"""Weight import: diffusers DiT and official DiT checkpoints must convert to the same function, exactly.

Tiny float32 models on CPU. The official checkpoint is synthesised from a diffusers DiT patched to the paper's
function (timestep frequency shift 0 in every block, pre-MLP LayerNorm eps 1e-6), with keys and the fixed position
table written here independently of patchflow's code.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import patchflow
from patchflow.cli import main as cli_main
from patchflow.convert import convert_diffusers_dit, convert_official_dit, diffusers_to_patchflow, official_to_patchflow
from patchflow.models.blocks import AdaLNBlock
from patchflow.models.dit import DiT, DiTConfig
from patchflow.models.embed import LabelEmbedder, TimestepEmbedder, sincos_3d

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

ATOL = 1e-5
HEADS, HEAD_DIM, C, CLASSES, SIZE, PATCH, DEPTH = 2, 16, 4, 10, 8, 2, 2
D = HEADS * HEAD_DIM


def random_dit(out_channels=2 * C, norm_eps=1e-5, heads=HEADS, head_dim=HEAD_DIM, seed=0) -> DiTTransformer2DModel:
    """A tiny diffusers DiT with every parameter random (adaLN and outputs are zero-initialised otherwise) and the
    per-block timestep/label embedders tied to block 0's, as in any DiT converted from the paper's weights."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=C,
                                  out_channels=out_channels, num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH,
                                  num_embeds_ada_norm=CLASSES, norm_eps=norm_eps)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    emb = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb)
    return model.eval()


def inputs(batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t[0], t[1] = 0, 999
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    y[-1] = CLASSES  # the null class (classifier-free guidance)
    return x, t, y


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def compare(ours, reference):
    """Both models on the same inputs(): (ours, reference's .sample, max abs difference)."""
    x, t, y = inputs()
    with torch.no_grad():
        expected = reference(x, t, y).sample
        got = ours(x, t, y)
    return got, expected, max_diff(got, expected)


def numpy_pos_embed(dim: int, h: int, w: int) -> np.ndarray:
    """The official recipe: per token (row-major), [1D(col), 1D(row)], 1D = [sin(pos*omega), cos(pos*omega)]."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.concatenate([one_d(dim // 2, cols.reshape(-1)), one_d(dim // 2, rows.reshape(-1))], axis=1)


def official_state_dict(model: DiTTransformer2DModel) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT key layout built from a diffusers DiT (mapping written independently of patchflow)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb."
    dim = sd["pos_embed.proj.weight"].shape[0]
    side = SIZE // PATCH
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],  # Conv2d (D, C, p, p)
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": torch.from_numpy(numpy_pos_embed(dim, side, side)).float()[None],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
    }
    for i in range(DEPTH):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd[f"{src}attn1.to_{p}.{kind}"] for p in "qkv"])
            out[f"{dst}attn.proj.{kind}"] = sd[f"{src}attn1.to_out.0.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}ff.net.0.proj.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}ff.net.2.{kind}"]
            out[f"{dst}adaLN_modulation.1.{kind}"] = sd[f"{src}norm1.linear.{kind}"]
    return out


def paper_dit(out_channels=2 * C, heads=4, head_dim=16) -> DiTTransformer2DModel:
    """diffusers DiT patched to compute the official DiT function."""
    model = random_dit(out_channels=out_channels, norm_eps=1e-6, heads=heads, head_dim=head_dim, seed=2)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


# ---------------------------------------------------------------------------------------------- a. block level


def test_block_and_conditioning_match_diffusers():
    model = random_dit()
    cfg, weights = diffusers_to_patchflow(model.state_dict(), dict(model.config))
    assert (cfg.time_freq_shift, cfg.mlp_norm_eps) == (1.0, 1e-5)
    block = AdaLNBlock(D, HEADS, mlp_norm_eps=1e-5).eval()
    block.load_state_dict({k.removeprefix("blocks.0."): v for k, v in weights.items() if k.startswith("blocks.0.")})
    temb = TimestepEmbedder(D, freq_shift=1).eval()
    temb.load_state_dict({k.removeprefix("t_embedder."): v for k, v in weights.items() if k.startswith("t_embedder.")})
    yemb = LabelEmbedder(CLASSES, D).eval()
    yemb.load_state_dict({"embedding_table.weight": weights["y_embedder.embedding_table.weight"]})

    _, t, y = inputs()
    noise = torch.randn(len(t), (SIZE // PATCH) ** 2, D, generator=torch.Generator().manual_seed(3))
    theirs_block = model.transformer_blocks[0]
    paper_block = AdaLNBlock(D, HEADS, mlp_norm_eps=1e-6).eval()
    paper_block.load_state_dict(block.state_dict())
    paper_temb = TimestepEmbedder(D, freq_shift=0).eval()
    paper_temb.load_state_dict(temb.state_dict())
    with torch.no_grad():
        c_theirs = theirs_block.norm1.emb(t, y, hidden_dtype=torch.float32)
        c_ours = temb(t) + yemb(y)
        diff_c = max_diff(c_ours, c_theirs)
        assert max_diff(paper_temb(t) + yemb(y), c_theirs) > 1e-3  # the paper's frequencies are told apart
        # tokens of scale 0.01 make the pre-MLP LayerNorm's eps (1e-5 vs the paper's 1e-6) visible
        for scale in (1.0, 0.01):
            tokens = scale * noise
            out_theirs = theirs_block(tokens, timestep=t, class_labels=y)
            diff_block = max_diff(block(tokens, c_ours), out_theirs)
            print(f"conditioning max abs diff {diff_c:.2e}; block (token scale {scale}) max abs diff {diff_block:.2e}")
            assert diff_block < ATOL * scale
            assert out_theirs.abs().max() > 2 * scale  # the block did real work
        assert max_diff(paper_block(tokens, c_ours), out_theirs) > 1e-4
    assert diff_c < ATOL


# ---------------------------------------------------------------------------------------------- b. whole model


@pytest.mark.parametrize("out_channels, sharded", [(2 * C, False), (C, True)])
def test_diffusers_dit_converts_to_same_function(tmp_path, out_channels, sharded):
    model = random_dit(out_channels=out_channels)
    src = tmp_path / "dit"
    model.save_pretrained(src, max_shard_size="40KB" if sharded else "10GB", safe_serialization=True)
    assert (src / "diffusion_pytorch_model.safetensors.index.json").is_file() == sharded
    run = convert_diffusers_dit(src, tmp_path / "run")
    ours = patchflow.load(run)
    assert ours.config.learn_sigma == (out_channels == 2 * C)
    assert (ours.config.time_freq_shift, ours.config.mlp_norm_eps) == (1.0, 1e-5)
    config_text = (run / "config.toml").read_text()
    assert 'objective = "ddpm"' in config_text and 'sampler = "ddpm"' in config_text

    got, expected, diff = compare(ours, model)
    print(f"diffusers DiT (out_channels={out_channels}, sharded={sharded}) max abs diff {diff:.2e}")
    assert got.shape == expected.shape == (5, out_channels, SIZE, SIZE)  # inputs() batch
    assert diff < ATOL
    assert expected.abs().max() > 0.1

    with pytest.raises(FileExistsError, match="already holds a run"):
        convert_diffusers_dit(src, run)


def test_diffusers_refuses_untied_embedders_and_pickle(tmp_path):
    model = random_dit()
    sd = model.state_dict()
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    sd[key] = sd[key] + 1e-3
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*shares one"):
        diffusers_to_patchflow(sd, dict(model.config))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        convert_diffusers_dit(tmp_path / "bin", tmp_path / "run")
    assert not (tmp_path / "run" / "config.toml").exists()


# ------------------------------------------------------------------------------------------------ c. official


@pytest.mark.parametrize("fmt", ["pt", "train-ckpt", "safetensors"])
def test_official_checkpoint_converts_to_paper_function(tmp_path, fmt):
    model = paper_dit()
    sd = official_state_dict(model)
    path = tmp_path / f"DiT-tiny.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "train-ckpt":  # official train.py layout: the EMA weights are the ones to take
        raw = {k: v + 0.5 for k, v in sd.items()}
        torch.save({"model": raw, "ema": sd, "opt": {"state": {}}, "args": argparse.Namespace(model="DiT-tiny")}, path)
    else:
        torch.save(sd, path)
    out = tmp_path / "run"
    assert cli_main(["convert", "dit-official", str(path), str(out), "--num-heads", "4"]) == 0
    ours = patchflow.load(out)
    assert (ours.config.time_freq_shift, ours.config.mlp_norm_eps, ours.config.num_heads) == (0.0, 1e-6, 4)
    assert ours.config.learn_sigma and ours.config.num_classes == CLASSES and ours.config.input_size == SIZE

    got, expected, diff = compare(ours, model)
    print(f"official DiT ({fmt}) max abs diff {diff:.2e}")
    assert diff < ATOL
    assert expected.abs().max() > 0.1
    # the stock diffusers function (shift 1, eps 1e-5) differs: the test tells the two apart
    stock = random_dit(norm_eps=1e-5, heads=4, head_dim=16)
    stock.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_diff(stock(*inputs()).sample, expected) > 1e-4


def test_official_checkpoint_errors(tmp_path, capsys):
    sd = official_state_dict(paper_dit())

    def convert(state_dict, name, *extra):
        path = tmp_path / f"{name}.pt"
        torch.save(state_dict, path)
        rc = cli_main(["convert", "dit-official", str(path), str(tmp_path / f"run-{name}"), *extra])
        return rc, capsys.readouterr().err

    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    rc, err = convert(missing, "missing", "--num-heads", "4")
    assert rc == 2 and "missing keys: 'blocks.1.mlp.fc2.bias'" in err

    extra = {**sd, "blocks.0.attn.rope_freqs": torch.zeros(3)}
    rc, err = convert(extra, "extra", "--num-heads", "4")
    assert rc == 2 and "unexpected keys: 'blocks.0.attn.rope_freqs'" in err

    shape = {**sd, "blocks.0.attn.proj.bias": torch.zeros(3)}
    rc, err = convert(shape, "shape", "--num-heads", "4")
    assert rc == 2 and "'blocks.0.attn.proj.bias' is (3,), expected (64,)" in err

    learned = {**sd, "pos_embed": sd["pos_embed"] + 1e-3}
    rc, err = convert(learned, "learned", "--num-heads", "4")
    assert rc == 2 and "pos_embed is not the fixed 2D sin-cos table" in err

    rc, err = convert(sd, "noheads")  # hidden 64 is no paper size
    assert rc == 2 and "--num-heads" in err
    for name in ("missing", "extra", "shape", "learned", "noheads"):
        assert not (tmp_path / f"run-{name}" / "config.toml").exists()

    rc, _ = convert(sd, "ok", "--num-heads", "4")
    assert rc == 0
    rc, err = convert(sd, "ok", "--num-heads", "4")
    assert rc == 2 and "already holds a run" in err


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_official_refuses_pickled_code(tmp_path, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = {"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "args": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match="needs full pickle"):
        convert_official_dit(path, tmp_path / "run", num_heads=2)
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ d. positions


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_positions_equal_official_recipe(grid):
    h, w = grid
    expected = torch.from_numpy(numpy_pos_embed(64, h, w)).float()
    assert max_diff(sincos_3d(64, (1, h, w)), expected) < 1e-6
    model = DiT(DiTConfig(hidden_size=64, num_heads=4, depth=1, input_size=8, num_classes=3))
    table = model.pos_embed((1, h, w), torch.zeros(1))[0]
    diff = max_diff(table, expected)
    print(f"sincos {h}x{w} D=64 max abs diff {diff:.2e}")
    assert diff < 1e-6
    # and not transposed: the first half of each row encodes the column
    assert max_diff(table, torch.from_numpy(numpy_pos_embed(64, w, h)).float()) > 0.1 or h == w


# ------------------------------------------------------------------------------------------------ e. heads


def synthetic_official(hidden: int, depth: int = 1) -> dict[str, torch.Tensor]:
    cfg = DiTConfig(hidden_size=hidden, num_heads=1, depth=depth, input_size=4, patch_size=2, num_classes=3,
                    learn_sigma=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT(cfg).state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    sd["x_embedder.proj.weight"] = torch.zeros(hidden, C, 2, 2)
    sd["pos_embed"] = torch.from_numpy(numpy_pos_embed(hidden, 2, 2)).float()[None]
    return sd


def test_num_heads_inference():
    cfg, weights = official_to_patchflow(synthetic_official(384))
    assert cfg.num_heads == 6 and cfg.hidden_size == 384 and cfg.depth == 1
    assert cfg.num_classes == 3 and cfg.learn_sigma and cfg.input_size == 4 and cfg.preset == ""
    assert weights["x_embedder.proj.weight"].shape == (384, C * 4) and "pos_embed" not in weights
    with pytest.raises(ValueError, match="--num-heads"):
        official_to_patchflow(synthetic_official(96))
    assert official_to_patchflow(synthetic_official(96), num_heads=3)[0].num_heads == 3
    with pytest.raises(ValueError, match="divisor"):
        official_to_patchflow(synthetic_official(96), num_heads=5)


def test_paper_preset_name_and_run_config(tmp_path):
    sd = synthetic_official(384, depth=12)
    cfg, _ = official_to_patchflow(sd)
    assert cfg.preset == "DiT-S/2"
    path = tmp_path / "s2.safetensors"
    save_file(sd, str(path))
    run = convert_official_dit(path, tmp_path / "run")
    loaded = patchflow.pipeline.load_run_config(run)
    assert loaded.model.preset == "DiT-S/2" and loaded.model.num_heads == 6
    assert (loaded.flow.objective, loaded.sample.sampler, loaded.sample.steps, loaded.sample.guidance) == \
        ("ddpm", "ddpm", 250, 4.0)
    assert loaded.data.dataset == "digits"
    assert json.dumps(loaded.to_dict())  # plain data
