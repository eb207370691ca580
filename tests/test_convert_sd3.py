"""diffusers SD3Transformer2DModel <-> patchflow MMDiT: the same function both ways, to float32 rounding.

Tiny models on CPU with every weight random (the zero-initialised adaLN and output layers too, so any wrong path
shows), compared on full-table, cropped and non-square inputs.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import patchflow
from patchflow.cli import main as cli_main
from patchflow.config import DataConfig, RunConfig
from patchflow.convert.sd3 import export_diffusers_sd3, import_diffusers_sd3
from patchflow.models.mmdit import MMDiT
from patchflow.models.text_config import MMDiTConfig
from patchflow.pipeline import load_run_config

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

ATOL = 1e-5
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=8)
SIZES = [(16, 16), (8, 8), (8, 12), (12, 6)]  # 8x8 patches (the whole table), 4x4, 4x6, 6x3
WEIGHTS = "diffusion_pytorch_model.safetensors"


def random_sd3(qk_norm=None, dual=(), seed=0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TINY, qk_norm=qk_norm, dual_attention_layers=dual)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval()


def inputs(height, width, batch=3, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    t = torch.tensor([0.0, 437.5, 1000.0])[:batch]
    return x, t, torch.randn(batch, length, 12, generator=g), torch.randn(batch, 10, generator=g)


@torch.no_grad()
def assert_same_function(ours, theirs, sizes=SIZES):
    for height, width in sizes:
        x, t, text, pooled = inputs(height, width)
        expected = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
        got = ours(x, t, text, pooled)
        assert expected.abs().mean() > 0.1  # a real signal, not zeros
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("qk_norm,dual", [(None, ()), ("rms_norm", ()), (None, (0, 1)), ("rms_norm", (0, 2))])
def test_import_gives_diffusers_function(tmp_path, qk_norm, dual):
    ref = random_sd3(qk_norm, dual)
    ref.save_pretrained(tmp_path / "sd3")
    out = import_diffusers_sd3(tmp_path / "sd3", tmp_path / "run")
    cfg = load_run_config(out)
    assert (cfg.model.arch, cfg.flow.objective, cfg.model.qk_norm) == ("mmdit", "rectified", qk_norm is not None)
    assert cfg.model.dual_attention_layers == list(dual) and cfg.model.pos_table_size == 8
    model = patchflow.load(out)
    assert isinstance(model, MMDiT)
    assert_same_function(model, ref)
    stock = random_sd3(qk_norm, dual, seed=1)  # another model: the comparison can fail
    with torch.no_grad():
        x, t, text, pooled = inputs(8, 8)
        other = stock(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
        assert (other - model(x, t, text, pooled)).abs().max() > 1e-2


def test_half_precision_checkpoint_imports(tmp_path):
    """SD3 checkpoints ship in fp16: the stored position table is the sin-cos table rounded to fp16."""
    half = random_sd3("rms_norm").half()
    half.save_pretrained(tmp_path / "sd3")
    model = patchflow.load(import_diffusers_sd3(tmp_path / "sd3", tmp_path / "run"))
    ref = SD3Transformer2DModel(**TINY, qk_norm="rms_norm").eval()  # the same rounded weights, exact positions
    weights = {k: v.float() for k, v in half.state_dict().items() if k != "pos_embed.pos_embed"}
    assert ref.load_state_dict(weights, strict=False).missing_keys == ["pos_embed.pos_embed"]
    assert_same_function(model, ref, sizes=[(16, 16), (8, 12)])


def test_cli_imports_sharded_pipeline_folder_and_exports_back(tmp_path):
    ref = random_sd3("rms_norm", (0,))
    pipe = tmp_path / "pipe"
    ref.save_pretrained(pipe / "transformer", max_shard_size="20KB")
    assert (pipe / "transformer" / (WEIGHTS + ".index.json")).is_file()
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    assert cli_main(["convert", "diffusers-sd3", str(pipe), str(tmp_path / "run")]) == 0
    cfg = load_run_config(tmp_path / "run")
    assert (cfg.flow.shift, cfg.sample.steps, cfg.sample.guidance) == (3.0, 28, 7.0)
    model = patchflow.load(tmp_path / "run")
    assert_same_function(model, ref)

    assert cli_main(["convert", "to-diffusers-sd3", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "back").eval()
    assert_same_function(model, back)
    with torch.no_grad():  # the round trip is the original function too
        x, t, text, pooled = inputs(8, 12)
        kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled)
        torch.testing.assert_close(back(**kw).sample, ref(**kw).sample, atol=ATOL, rtol=ATOL)


def test_native_run_exports_to_diffusers(tmp_path):
    """A model patchflow trained (default table of twice the grid, QK-norm) loads in diffusers unchanged."""
    cfg = MMDiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=16, depth=2, num_heads=2, text_dim=12,
                      pooled_dim=10, qk_norm=True, dual_attention_layers=[1])
    model = MMDiT(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(RunConfig(model=cfg, data=DataConfig(dataset="color-digits")).validate().to_toml())
    save_file(model.state_dict(), run / "ema.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, run / "model.safetensors")
    out = export_diffusers_sd3(run, tmp_path / "sd3")
    config = json.loads((out / "config.json").read_text())
    assert (config["pos_embed_max_size"], config["qk_norm"], config["dual_attention_layers"]) == (8, "rms_norm", [1])
    theirs = SD3Transformer2DModel.from_pretrained(out).eval()
    assert_same_function(model.eval(), theirs)
    raw = export_diffusers_sd3(run, tmp_path / "raw", ema=False)  # model.safetensors: the zeroed weights
    with torch.no_grad():
        x, t, text, pooled = inputs(8, 8)
        zero = SD3Transformer2DModel.from_pretrained(raw)(x, text, pooled, t).sample
    assert torch.count_nonzero(zero) == 0


def saved(tmp_path, name, edit_config=None, edit_weights=None):
    """A saved tiny SD3 folder, with its config.json or tensors edited."""
    folder = tmp_path / name
    random_sd3(qk_norm="rms_norm").save_pretrained(folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_weights:
        tensors = load_file(folder / WEIGHTS)
        edit_weights(tensors)
        save_file(tensors, folder / WEIGHTS)
    return folder


def test_import_errors_name_the_problem(tmp_path, capsys):
    def convert(folder):
        rc = cli_main(["convert", "diffusers-sd3", str(folder), str(tmp_path / f"run-{folder.name}")])
        return rc, capsys.readouterr().err

    cases = {
        "missing": (None, lambda w: w.pop("transformer_blocks.1.attn.to_k.bias"),
                    "missing keys: 'transformer_blocks.1.attn.to_k.bias'"),
        "extra": (None, lambda w: w.update({"transformer_blocks.0.attn.rope": torch.zeros(2)}),
                  "unexpected keys: 'transformer_blocks.0.attn.rope'"),
        "noq": (None, lambda w: w.pop("transformer_blocks.2.attn.add_q_proj.weight"),
                "missing keys: 'transformer_blocks.2.attn.add_q_proj.weight'"),
        "learned": (None, lambda w: w["pos_embed.pos_embed"].add_(1e-3), "not the fixed 2D sin-cos table"),
        "outch": (lambda c: c.update(out_channels=8), None, "out_channels = 8 differs from in_channels = 4"),
        "caption": (lambda c: c.update(caption_projection_dim=32), None, "caption_projection_dim = 32 differs"),
        "layernorm": (lambda c: c.update(qk_norm="layer_norm"), None, "qk_norm = 'layer_norm'"),
        "nopos": (lambda c: c.update(pos_embed_max_size=None), None, "pos_embed_max_size = None"),
        "class": (lambda c: c.update(_class_name="FluxTransformer2DModel"), None, "expected 'SD3Transformer2DModel'"),
    }
    for name, (edit_config, edit_weights, message) in cases.items():
        rc, err = convert(saved(tmp_path, name, edit_config, edit_weights))
        assert rc == 2 and message in err, (name, err)
        assert not (tmp_path / f"run-{name}" / "config.toml").exists()  # nothing half-written

    pickled = saved(tmp_path, "pickled")
    (pickled / WEIGHTS).unlink()
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    rc, err = convert(pickled)
    assert rc == 2 and "does not unpickle" in err
    rc, err = convert(tmp_path / "nowhere")
    assert rc == 2 and "not found" in err

    ok = saved(tmp_path, "ok")
    assert convert(ok)[0] == 0
    rc, err = convert(ok)
    assert rc == 2 and "already holds a run" in err
    rc, err = cli_main(["convert", "to-diffusers-sd3", str(tmp_path / "run-ok"), str(ok)]), capsys.readouterr().err
    assert rc == 2 and "already holds a model" in err
    dit_run = tmp_path / "dit-run"
    dit_run.mkdir()
    (dit_run / "config.toml").write_text(RunConfig().validate().to_toml())
    rc = cli_main(["convert", "to-diffusers-sd3", str(dit_run), str(tmp_path / "dit-out")])
    assert rc == 2 and "only MMDiT runs" in capsys.readouterr().err
    rc = cli_main(["convert", "diffusers-sd3", str(ok), str(tmp_path / "x"), "--num-heads", "2"])
    assert rc == 2 and "--num-heads is for dit-official" in capsys.readouterr().err
