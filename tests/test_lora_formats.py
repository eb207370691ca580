"""Adapter files other tools read: the diffusers/PEFT export loads with diffusers' own loaders and computes
patchflow's function; the kohya export gives the same weight deltas through diffusers' converter of original SD3
checkpoints; both read back into patchflow exactly, and so does an adapter PEFT trained on diffusers' modules."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from patchflow.checks import ConfigError
from patchflow.convert.sd3 import patchflow_to_diffusers_sd3
from patchflow.convert.sd3_original import patchflow_to_original_sd3
from patchflow.lora.adapters import add_adapters, layers_of, merge, split_adapter
from patchflow.lora.apply import read, write
from patchflow.lora.config import LoRAConfig
from patchflow.lora.files import Adapter
from patchflow.models.mmdit import MMDiT
from patchflow.models.text_config import MMDiTConfig
from text_model_inputs import randomize

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

ATOL = 1e-5
CFG = MMDiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=16, depth=3, num_heads=2, text_dim=12,
                  pooled_dim=10, pos_embed_max_size=8, qk_norm=True, dual_attention_layers=[0])
# every kind of layer: fused qkv (both streams, the last block's kv-only), swapped adaLN halves, the patch conv
TARGETS = ["attn.*", "attn2.*", "mlp.*", "text_mlp.fc2", "text_adaLN_modulation.1", "final_layer.*",
           "x_embedder.proj", "t_embedder.mlp.0"]


def lora_model(rank=4, alpha=8.0, seed=0):
    """A random MMDiT with a random adapter (up not zero) -> (model, base weights, Adapter)."""
    model = randomize(MMDiT(CFG), std=0.15).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    weights = split_adapter(model.state_dict())[1]
    return model, base, Adapter(weights, rank, alpha, TARGETS, [], "ab" * 32, "mmdit")


def diffusers_model(base):
    config, weights = patchflow_to_diffusers_sd3(base, CFG)
    model = SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict(weights)
    return model.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.0, 437.5, 1000.0]),
            torch.randn(3, 5, 12, generator=g), torch.randn(3, 10, generator=g))


@torch.no_grad()
def assert_same_function(ours, theirs):
    x, t, text, pooled = inputs()
    want = ours(x, t, text, pooled)
    got = theirs(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_the_diffusers_export_loads_with_diffusers_and_computes_patchflows_function(tmp_path):
    model, base, adapter = lora_model()
    path = write(adapter, CFG, "diffusers", tmp_path / "pytorch_lora_weights.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert not [k for k in keys if ".default" in k or "base_model" in k]
    config = json.loads(meta["lora_adapter_metadata"])
    # alpha / rank = 2 is baked into lora_B, so lora_alpha = r: the same function whether diffusers reads the
    # metadata (use_safetensors=True, the pipeline) or not (load_lora_adapter's default)
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 4
    assert "transformer_blocks.1.attn.to_q" in config["transformer.target_modules"]
    for kw in ({}, {"use_safetensors": True}):
        theirs = diffusers_model(base)
        theirs.load_lora_adapter(str(path), prefix="transformer", **kw)
        assert_same_function(model, theirs)
    # the pipeline's loader reads the same file (as StableDiffusion3Pipeline.load_lora_weights does)
    again = diffusers_model(base)
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, transformer=again, metadata=metadata)
    assert_same_function(model, again)


def test_the_kohya_export_gives_the_same_deltas_through_diffusers_converter(tmp_path):
    _, base, adapter = lora_model()
    path = write(adapter, CFG, "kohya", tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert "lora_unet_joint_blocks_2_context_block_attn_qkv" in modules  # the original names, fused qkv
    assert all(float(tensors[m + ".alpha"]) == 8.0 for m in modules)  # every module has its alpha
    # the deltas on the original checkpoint's names, read by diffusers' converter of original SD3 checkpoints
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    original = patchflow_to_original_sd3(zeros, CFG)
    names = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    for m in modules:
        up, down = tensors[m + ".lora_up.weight"], tensors[m + ".lora_down.weight"]
        d = 8.0 / 4 * up.flatten(1) @ down.flatten(1)
        original[names[m]] = d.reshape(original[names[m]].shape)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(original)
    want = patchflow_to_diffusers_sd3(merge(zeros, [(adapter.weights, adapter.scale)]), CFG)[1]
    for k in want:
        if k != "pos_embed.pos_embed":
            torch.testing.assert_close(theirs[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    assert any(want[k].abs().sum() > 0 for k in want)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exports_read_back_exactly(tmp_path, fmt):
    _, base, adapter = lora_model()
    back = read(write(adapter, CFG, fmt, tmp_path / "a.safetensors"), CFG)
    assert back.rank == 4 and back.scale == 1.0 and back.base_hash == adapter.base_hash
    assert layers_of(back.weights) == layers_of(adapter.weights)  # same layers, same rank (shared down)
    got, want = merge(base, [(back.weights, back.scale)]), merge(base, [(adapter.weights, adapter.scale)])
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)


def test_an_adapter_peft_trained_on_diffusers_modules_reads_into_patchflow(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = randomize(MMDiT(CFG), std=0.15).eval()
    theirs = diffusers_model(model.state_dict())
    # separate q and k adapters (no v), as diffusers' SD3 training script makes them, and ff on one block
    theirs.add_adapter(LoraConfig(r=3, lora_alpha=6, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "transformer_blocks.1.ff.net.2"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(theirs),
                                               transformer_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
    adapter = read(tmp_path / "pytorch_lora_weights.safetensors", CFG)
    assert adapter.weights["blocks.0.attn.qkv.lora_down.weight"].shape == (6, 16)  # q and k stacked
    model.load_state_dict(merge(model.state_dict(), [(adapter.weights, adapter.scale)]))
    assert_same_function(model, theirs)


def test_foreign_adapters_for_another_model_are_refused(tmp_path):
    _, _, adapter = lora_model()
    path = write(adapter, CFG, "kohya", tmp_path / "a.safetensors")
    deeper = MMDiTConfig(**{**CFG.__dict__, "depth": 2})
    with pytest.raises(ConfigError, match="does not have: .*joint_blocks_2"):
        read(path, deeper)
    wider = MMDiTConfig(**{**CFG.__dict__, "mlp_ratio": 2.0})
    with pytest.raises(ConfigError, match="output rows"):
        read(path, wider)
    with pytest.raises(ConfigError, match="give the run it is for"):
        read(path)
    cross = MMDiTConfig(**{**CFG.__dict__, "arch": "crossdit", "dual_attention_layers": []})
    with pytest.raises(ConfigError, match="export it as --format patchflow"):
        write(adapter, cross, "diffusers", tmp_path / "b.safetensors")


def test_a_lora_run_converts_to_diffusers_with_its_adapter_merged(tmp_path):
    import dataclasses

    from safetensors.torch import load_file, save_file

    from patchflow.config import DataConfig, RunConfig
    from patchflow.convert.sd3 import export_diffusers_sd3
    from patchflow.weights import hash_files

    _, base, adapter = lora_model()
    base_run, run = tmp_path / "base", tmp_path / "lora"
    base_run.mkdir(), run.mkdir()
    cfg = RunConfig(model=CFG, data=DataConfig(dataset="color-digits")).validate()
    (base_run / "config.toml").write_text(cfg.to_toml())
    save_file(base, base_run / "ema.safetensors")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, base_hash=hash_files([base_run / "ema.safetensors"]))
    cfg = dataclasses.replace(cfg, lora=lora, train=dataclasses.replace(cfg.train, init_from=str(base_run)))
    (run / "config.toml").write_text(cfg.validate().to_toml())
    save_file(adapter.weights, run / "ema.safetensors")
    out = export_diffusers_sd3(run, tmp_path / "sd3")
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = patchflow_to_diffusers_sd3(merge(base, [(adapter.weights, 2.0)]), CFG)[1]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
