"""Import class-conditional DiT weights into patchflow run directories.

Two sources are understood; both are read without unpickling code.

Official checkpoints (facebookresearch/DiT, e.g. ``DiT-XL-2-256x256.pt``)
    A ``torch.save``'d state dict, or a training checkpoint ``{"model", "ema", "opt", "args"}`` (the EMA weights
    are taken when present, else "model"); a ``.safetensors`` file holding the same state dict is accepted too.
    Keys and shapes (D hidden size, C latent channels, p patch, N = (input_size / p)^2 tokens, K classes)::

        x_embedder.proj.{weight (D, C, p, p) Conv2d, bias}
        pos_embed                                  (1, N, D) fixed 2D sin-cos table (a buffer)
        t_embedder.mlp.{0,2}.{weight,bias}         256-dim [cos, sin] timestep features -> D -> D
        y_embedder.embedding_table.weight          (K + 1, D), the last row is the null class
        blocks.{i}.attn.qkv.{weight (3D, D),bias}  blocks.{i}.attn.proj.*
        blocks.{i}.mlp.fc1.*  blocks.{i}.mlp.fc2.*  blocks.{i}.adaLN_modulation.1.* (6D: shift, scale, gate x 2)
        final_layer.linear.{weight (p*p*C_out, D), bias}   final_layer.adaLN_modulation.1.* (2D: shift, scale)

    patchflow's DiT uses the same names except ``x_embedder.proj.weight``, a Linear weight (D, C*p*p) that is the
    conv weight flattened, and it has no ``pos_embed``: positions are computed (``sincos_3d``), so the stored table
    is only checked. C_out = 2C when the model learns the variance (``learn_sigma``). The number of heads is not
    stored anywhere; the paper's sizes (hidden 384/768/1024/1152 -> 6/12/16/16 heads) are recognised, others need
    ``num_heads`` (``--num-heads``).

diffusers ``DiTTransformer2DModel`` (or the older ``Transformer2DModel`` with ``norm_type="ada_norm_zero"``)
    A ``save_pretrained`` folder: ``config.json`` plus ``diffusion_pytorch_model.safetensors``, or shards listed in
    ``diffusion_pytorch_model.safetensors.index.json``. A pipeline folder with a ``transformer/`` subfolder works
    too. Pickled ``.bin`` weights are refused. Names::

        pos_embed.proj.*                                         -> x_embedder.proj.* (conv weight flattened)
        transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}.*  -> t_embedder.mlp.{0,2}.*
        transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight -> y_embedder.embedding_table.weight
        transformer_blocks.{i}.norm1.linear.*                    -> blocks.{i}.adaLN_modulation.1.*
        transformer_blocks.{i}.attn1.to_{q,k,v}.*                -> blocks.{i}.attn.qkv.* (concatenated q, k, v)
        transformer_blocks.{i}.attn1.to_out.0.*                  -> blocks.{i}.attn.proj.*
        transformer_blocks.{i}.ff.net.0.proj.* / ff.net.2.*      -> blocks.{i}.mlp.fc1.* / mlp.fc2.*
        proj_out_1.*                                             -> final_layer.adaLN_modulation.1.* (shift, scale)
        proj_out_2.*                                             -> final_layer.linear.*

    diffusers keeps a copy of the timestep and label embedders in every block; patchflow shares one, so the copies
    must be identical (they are in converted official weights). diffusers' DiT is not exactly the paper's function:
    its timestep frequencies divide by (128 - 1) instead of 128 (``Timesteps(256, flip_sin_to_cos=True,
    downscale_freq_shift=1)``) and its pre-MLP LayerNorm uses ``norm_eps`` (default 1e-5, paper 1e-6). The imported
    config sets ``time_freq_shift = 1`` and ``mlp_norm_eps = norm_eps`` so the converted model computes exactly
    what the diffusers model computes.

Both converters write a run directory: ``config.toml`` (flow.objective = "ddpm", 250 DDPM steps, guidance 4),
``model.safetensors`` and ``ema.safetensors`` (the same float32 weights). ``patchflow.load(out_dir)`` then returns
a model called as ``model(x, t, y)`` with t in 0..999 and y in 0..K (K = null), like the source model.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from patchflow.config import FlowConfig, RunConfig, SampleConfig, from_dict, tomllib
from patchflow.models.dit import DIT_SIZES, DiT, DiTConfig
from patchflow.models.embed import sincos_3d
from patchflow.weights import atomic_save_safetensors, atomic_write_text, layout_mismatch, name_list

__all__ = ["OFFICIAL_NUM_HEADS", "convert_diffusers_dit", "convert_official_dit", "diffusers_to_patchflow",
           "load_diffusers_dit", "load_official_state_dict", "official_to_patchflow"]

# The paper's hidden sizes -> attention heads (DiT-S, -B, -L, -XL).
OFFICIAL_NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
PAPER_FAMILIES = ("S", "B", "L", "XL")
PAPER_PATCHES = (2, 4, 8)
# CombinedTimestepLabelEmbeddings builds Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1); the shift is
# hard-coded there, not in config.json.
DIFFUSERS_TIME_FREQ_SHIFT = 1.0
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
POS_EMBED_ATOL = 1e-5
_LIST = 8  # keys named per kind of mismatch in an error


# ----------------------------------------------------------------------------------------------------- shared


def _expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """patchflow's state-dict shapes for a config, from a model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = DiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_keys(found: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Strict: every expected key present, nothing unexpected, every shape right; the error lists what is off."""
    problem = layout_mismatch(found, expected, limit=_LIST)
    if problem:
        raise ValueError(f"{source} does not have the expected DiT layout; {problem}")


def _require(state_dict: dict, keys, source: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        sample = name_list(list(state_dict)[:_LIST]) if state_dict else "none"
        raise ValueError(f"{source}: missing keys: {name_list(missing)} (needed to infer the model size); "
                         f"keys found include: {sample}")


def _check_tensors(state_dict: dict, source: str) -> None:
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{source}: expected a non-empty dict of tensors, got {type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source}: entries that are not named tensors: {name_list(map(str, bad))}")


def _check_pos_embed(table: Tensor, cfg: DiTConfig, source: str) -> None:
    """A stored (1, N, D) position table must be the fixed sin-cos table patchflow computes."""
    side = cfg.input_size // cfg.patch_size
    ours = sincos_3d(cfg.hidden_size, (1, side, side))
    diff = (table.detach().reshape(ours.shape).to(torch.float64) - ours.to(torch.float64)).abs().max().item()
    if not diff <= POS_EMBED_ATOL:
        raise ValueError(f"{source}: pos_embed is not the fixed 2D sin-cos table for a {side}x{side} grid of "
                         f"hidden size {cfg.hidden_size} (max abs difference {diff:.3g} > {POS_EMBED_ATOL}); "
                         "patchflow computes positions and cannot hold learned or resized tables")


def _preset_name(cfg: DiTConfig) -> str:
    """'DiT-XL/2' when the size is one of the paper's, else ''."""
    for family in PAPER_FAMILIES:
        if (DIT_SIZES[family] == (cfg.depth, cfg.hidden_size, cfg.num_heads) and cfg.patch_size in PAPER_PATCHES
                and cfg.mlp_ratio == 4.0):
            return f"DiT-{family}/{cfg.patch_size}"
    return ""


def _name_and_validate(cfg: DiTConfig, problem: str) -> None:
    """Name the preset the config matches, then validate it; a ValueError says `problem: what is wrong`."""
    cfg.preset = _preset_name(cfg)
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{problem}: {e}") from None


def _mlp_ratio(hidden: int, mlp_hidden: int, source: str) -> float:
    ratio = mlp_hidden / hidden
    if int(hidden * ratio) != mlp_hidden:
        raise ValueError(f"{source}: MLP width {mlp_hidden} is not representable as int({hidden} * mlp_ratio)")
    return ratio


def _finish(weights: dict[str, Tensor], cfg: DiTConfig, source: str) -> dict[str, Tensor]:
    """float32, contiguous, and exactly the keys and shapes patchflow's DiT has."""
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in weights.items()}
    _check_keys(out, _expected_shapes(cfg), f"{source} (after mapping to patchflow names)")
    return out


def _check_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    if (out / "config.toml").exists():
        raise FileExistsError(f"{out} already holds a run (config.toml exists); choose a new output directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    return out


def _run_config(cfg: DiTConfig) -> RunConfig:
    """DiT's DDPM setup: 1000-step linear schedule, 250 ancestral steps, guidance 4."""
    run = RunConfig(model=cfg, flow=FlowConfig(objective="ddpm"),
                    sample=SampleConfig(sampler="ddpm", steps=250, guidance=4.0)).validate()
    from_dict(tomllib.loads(run.to_toml()))  # what patchflow.load will read must parse back
    return run


def _write_run(out_dir, cfg: DiTConfig, weights: dict[str, Tensor], source: str) -> Path:
    """Weights first, config.toml last: a directory with config.toml is a complete run."""
    out = _check_out_dir(out_dir)
    toml = _run_config(cfg).to_toml()
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "converted_from": source}
    atomic_save_safetensors(weights, out / "model.safetensors", metadata=metadata)
    atomic_save_safetensors(weights, out / "ema.safetensors", metadata=metadata)
    atomic_write_text(out / "config.toml", toml)
    return out


# ------------------------------------------------------------------------------------------------- official


def load_official_state_dict(path) -> dict[str, Tensor]:
    """Tensors of an official checkpoint: .pt/.pth read with weights_only=True (never pickle code), or .safetensors.

    A training checkpoint {"model", "ema", "opt", "args"} yields its "ema" weights ("model" when there is no EMA).
    Only argparse.Namespace (the "args" entry of the official train.py) is allowed beyond torch's safe types.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), "").rstrip(".")
        raise ValueError(
            f"{path}: refusing to load: this file needs full pickle (it references Python objects beyond tensors"
            f"{': ' + detail if detail else ''}), and unpickling can run arbitrary code. patchflow only reads "
            "checkpoints with torch.load(weights_only=True); re-save just the state dict "
            "(torch.save(model.state_dict(), path)) or as .safetensors") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(data, dict):
        for key in ("ema", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    _check_tensors(data, str(path))
    return data


def official_to_patchflow(state_dict: dict[str, Tensor], num_heads: int | None = None,
                          source: str = "official DiT checkpoint") -> tuple[DiTConfig, dict[str, Tensor]]:
    """Official DiT state dict -> (inferred DiTConfig, patchflow state dict). See the module docstring for keys.

    Config from shapes: D, p, C from x_embedder; depth from the block count; input_size from pos_embed's length;
    learn_sigma from the final linear (p*p*2C outputs); num_classes = label-table rows - 1. Raises ValueError on
    any missing/unexpected key, wrong shape, non-sin-cos pos_embed, or unknown hidden size without num_heads.
    """
    _check_tensors(state_dict, source)
    sd = state_dict
    _require(sd, ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                  "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"), source)
    patch_w = sd["x_embedder.proj.weight"]
    if patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
        raise ValueError(f"{source}: x_embedder.proj.weight should be a Conv2d weight (D, C, p, p), "
                         f"got {tuple(patch_w.shape)}")
    hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    pos = sd["pos_embed"]
    tokens = pos.shape[1] if pos.ndim == 3 else -1
    side = math.isqrt(max(tokens, 0))
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden or side * side != tokens or side == 0:
        raise ValueError(f"{source}: pos_embed should be (1, N, {hidden}) with N a square number of tokens, "
                         f"got {tuple(pos.shape)}")
    out_features = sd["final_layer.linear.weight"].shape[0]
    out_channels, rest = divmod(out_features, patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{source}: final_layer.linear has {out_features} outputs; expected p*p*C = "
                         f"{patch * patch * in_channels} or p*p*2C = {2 * patch * patch * in_channels}")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if num_heads is None:
        if hidden not in OFFICIAL_NUM_HEADS:
            raise ValueError(f"{source}: hidden size {hidden} is not one of the paper's DiT sizes "
                             f"({', '.join(f'{d} -> {h} heads' for d, h in OFFICIAL_NUM_HEADS.items())}) and the "
                             "number of attention heads is not stored in the weights; pass it with --num-heads N")
        num_heads = OFFICIAL_NUM_HEADS[hidden]
    if not isinstance(num_heads, int) or num_heads < 1 or hidden % num_heads:
        raise ValueError(f"--num-heads {num_heads} must be a positive divisor of the hidden size {hidden}")
    cfg = DiTConfig(
        input_size=side * patch, in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=_mlp_ratio(hidden, sd["blocks.0.mlp.fc1.weight"].shape[0], source),
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, class_dropout_prob=0.1,
        learn_sigma=out_channels == 2 * in_channels, time_freq_shift=0.0, mlp_norm_eps=1e-6,
    )
    _name_and_validate(cfg, f"{source}: inferred an impossible config")

    expected = _expected_shapes(cfg)
    expected["x_embedder.proj.weight"] = (hidden, in_channels, patch, patch)
    expected["pos_embed"] = (1, side * side, hidden)
    _check_keys(sd, expected, source)
    _check_pos_embed(pos, cfg, source)

    weights = {k: v for k, v in sd.items() if k != "pos_embed"}
    weights["x_embedder.proj.weight"] = patch_w.reshape(hidden, -1)  # (D, C, p, p) -> (D, C*p*p): (c, ph, pw)
    return cfg, _finish(weights, cfg, source)


def convert_official_dit(ckpt_path, out_dir, num_heads: int | None = None) -> Path:
    """Official DiT checkpoint (.pt/.pth/.safetensors) -> patchflow run directory `out_dir`; returns its path."""
    _check_out_dir(out_dir)
    state_dict = load_official_state_dict(ckpt_path)
    cfg, weights = official_to_patchflow(state_dict, num_heads=num_heads, source=str(ckpt_path))
    return _write_run(out_dir, cfg, weights, f"dit-official:{Path(ckpt_path).name}")


# ------------------------------------------------------------------------------------------------- diffusers

_EMB = "norm1.emb."
_EMB_MAP = {  # diffusers key under transformer_blocks.{i}.norm1.emb -> patchflow key
    "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
_BLOCK_MAP = {  # diffusers key under transformer_blocks.{i} -> patchflow key under blocks.{i}
    "norm1.linear.weight": "adaLN_modulation.1.weight",
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "attn1.to_out.0.weight": "attn.proj.weight",
    "attn1.to_out.0.bias": "attn.proj.bias",
    "ff.net.0.proj.weight": "mlp.fc1.weight",
    "ff.net.0.proj.bias": "mlp.fc1.bias",
    "ff.net.2.weight": "mlp.fc2.weight",
    "ff.net.2.bias": "mlp.fc2.bias",
}
_DIFFUSERS_FIXED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False, "cross_attention_dim": None}
_TOP_MAP = {
    "pos_embed.proj.bias": "x_embedder.proj.bias",
    "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight",
    "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
    "proj_out_2.weight": "final_layer.linear.weight",
    "proj_out_2.bias": "final_layer.linear.bias",
}


def load_diffusers_dit(model_dir) -> tuple[dict, dict[str, Tensor]]:
    """(config.json, tensors) of a diffusers DiT folder: single or sharded safetensors, or a pipeline's transformer/."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"diffusers model folder {d} not found")
    if not (d / "config.json").is_file() and (d / "transformer" / "config.json").is_file():
        d = d / "transformer"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; pass the folder that "
                                "DiTTransformer2DModel.save_pretrained wrote")
    try:
        config = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'config.json'}: not valid JSON: {e}") from None
    if (d / DIFFUSERS_WEIGHTS).is_file():
        return config, load_file(str(d / DIFFUSERS_WEIGHTS))
    if (d / DIFFUSERS_INDEX).is_file():
        weight_map = json.loads((d / DIFFUSERS_INDEX).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{d / DIFFUSERS_INDEX} has no weight_map")
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or not (d / shard).is_file():
                raise FileNotFoundError(f"{d / DIFFUSERS_INDEX} names shard {shard!r}, which is not a file in {d}")
            tensors.update(load_file(str(d / shard)))
        absent = set(weight_map) - set(tensors)
        if absent:
            raise ValueError(f"{d}: the shards lack keys listed in the index: {name_list(absent)}")
        return config, tensors
    if any(d.glob("*.bin")):
        raise ValueError(f"{d} holds only pickled .bin weights, which patchflow does not unpickle; re-save the "
                         "model with save_pretrained(path, safe_serialization=True) to get safetensors")
    raise FileNotFoundError(f"{d} has neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")


def diffusers_to_patchflow(state_dict: dict[str, Tensor], config: dict,
                           source: str = "diffusers DiT") -> tuple[DiTConfig, dict[str, Tensor]]:
    """diffusers DiTTransformer2DModel tensors + its config.json dict -> (DiTConfig, patchflow state dict).

    The config reproduces diffusers' function exactly (time_freq_shift = 1, mlp_norm_eps = norm_eps). Raises
    ValueError on an unsupported config, any missing/unexpected key or wrong shape, or per-block timestep/label
    embedders that differ (patchflow shares one).
    """
    _check_tensors(state_dict, source)
    sd = state_dict

    name = config.get("_class_name", DIFFUSERS_CLASSES[0])
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"{source}: config _class_name = {name!r}; expected one of {', '.join(DIFFUSERS_CLASSES)}")
    for key, wanted in _DIFFUSERS_FIXED.items():  # settings patchflow's DiT cannot change; defaults = DiT's
        value = config.get(key, wanted)
        if value != wanted:
            raise ValueError(f"{source}: config {key} = {value!r} is not a DiT patchflow can hold (needs {wanted!r})")
    try:
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        in_channels, depth = int(config["in_channels"]), int(config["num_layers"])
        patch, sample_size = int(config["patch_size"]), int(config["sample_size"])
        num_classes = int(config["num_embeds_ada_norm"])
    except KeyError as e:
        raise ValueError(f"{source}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: config.json has a non-integer size: {e}") from None
    out_channels = int(config.get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{source}: out_channels = {out_channels} must be in_channels ({in_channels}) or twice "
                         "that (learned variance)")
    hidden = heads * head_dim
    mlp_key = "transformer_blocks.0.ff.net.0.proj.weight"
    mlp_ratio = _mlp_ratio(hidden, sd[mlp_key].shape[0], source) if mlp_key in sd else 4.0
    cfg = DiTConfig(
        input_size=sample_size, in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes, class_dropout_prob=0.1,
        learn_sigma=out_channels == 2 * in_channels, time_freq_shift=DIFFUSERS_TIME_FREQ_SHIFT,
        mlp_norm_eps=float(config.get("norm_eps", 1e-5)),
    )
    _name_and_validate(cfg, f"{source}: config.json describes an impossible DiT")

    # Expected diffusers keys and shapes, derived from patchflow's shapes through the name map.
    ours = _expected_shapes(cfg)
    expected = {"pos_embed.proj.weight": (hidden, in_channels, patch, patch)}
    expected.update({theirs: ours[mine] for theirs, mine in _TOP_MAP.items()})
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        expected.update({pre + _EMB + theirs: ours[mine] for theirs, mine in _EMB_MAP.items()})
        expected.update({pre + theirs: ours[f"blocks.{i}.{mine}"] for theirs, mine in _BLOCK_MAP.items()})
        for part in "qkv":
            expected[f"{pre}attn1.to_{part}.weight"] = (hidden, hidden)
            expected[f"{pre}attn1.to_{part}.bias"] = (hidden,)
    if "pos_embed.pos_embed" in sd:  # a persistent position buffer (pos_embed_max_size models) is checked, dropped
        side = sample_size // patch
        expected["pos_embed.pos_embed"] = (1, side * side, hidden)
    _check_keys(sd, expected, source)
    if "pos_embed.pos_embed" in sd:
        _check_pos_embed(sd["pos_embed.pos_embed"], cfg, source)

    for i in range(1, depth):
        for suffix in _EMB_MAP:
            first, other = sd[f"transformer_blocks.0.{_EMB}{suffix}"], sd[f"transformer_blocks.{i}.{_EMB}{suffix}"]
            if not torch.equal(first, other):
                diff = (first.float() - other.float()).abs().max().item()
                raise ValueError(
                    f"{source}: transformer_blocks.{i}.{_EMB}{suffix} differs from block 0's copy (max abs "
                    f"difference {diff:.3g}); patchflow shares one timestep/label embedder across blocks, so "
                    "only models whose per-block embedders are identical can be converted exactly")

    weights = {mine: sd[theirs] for theirs, mine in _TOP_MAP.items()}
    weights["x_embedder.proj.weight"] = sd["pos_embed.proj.weight"].reshape(hidden, -1)
    weights.update({mine: sd[f"transformer_blocks.0.{_EMB}{theirs}"] for theirs, mine in _EMB_MAP.items()})
    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        weights.update({f"blocks.{i}.{mine}": sd[pre + theirs] for theirs, mine in _BLOCK_MAP.items()})
        for kind in ("weight", "bias"):
            weights[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{pre}attn1.to_{p}.{kind}"] for p in "qkv"])
    return cfg, _finish(weights, cfg, source)


def convert_diffusers_dit(model_dir, out_dir) -> Path:
    """diffusers DiT save_pretrained folder -> patchflow run directory `out_dir`; returns its path."""
    _check_out_dir(out_dir)
    config, state_dict = load_diffusers_dit(model_dir)
    cfg, weights = diffusers_to_patchflow(state_dict, config, source=str(model_dir))
    return _write_run(out_dir, cfg, weights, f"diffusers-dit:{Path(model_dir).name}")
