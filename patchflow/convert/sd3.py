"""Stable Diffusion 3 transformers: diffusers' ``SD3Transformer2DModel`` <-> patchflow's ``MMDiT``, exactly.

``import_diffusers_sd3(src, out_dir)`` reads a ``save_pretrained`` folder (``config.json`` plus
``diffusion_pytorch_model.safetensors``, or shards listed in ``diffusion_pytorch_model.safetensors.index.json``; a
pipeline folder with a ``transformer/`` subfolder works too; pickled ``.bin`` weights are refused) and writes a
patchflow run directory. ``export_diffusers_sd3(run_dir, out_dir)`` writes the folder back, loadable with
``SD3Transformer2DModel.from_pretrained(out_dir)``. Both models then compute the same function:
``model(x, t, text, pooled)`` equals ``SD3Transformer2DModel(hidden_states=x, timestep=t,
encoder_hidden_states=text, pooled_projections=pooled).sample`` with t = sigma * 1000.

config.json -> [model] (arch = "mmdit")::

    num_attention_heads * attention_head_dim -> hidden_size     num_attention_heads -> num_heads
    sample_size -> input_size     patch_size, in_channels -> the same     num_layers -> depth
    joint_attention_dim -> text_dim     pooled_projection_dim -> pooled_dim     pos_embed_max_size -> the same
    dual_attention_layers -> the same   qk_norm: null -> false, "rms_norm" -> true

patchflow cannot hold (and refuses): out_channels != in_channels, caption_projection_dim != the hidden size, other
qk_norm kinds, pos_embed_max_size null (interpolated instead of cropped positions). The MLP ratio is 4 on both sides.

Weights (block i; "(q, k, v)" = the tensors concatenated in that order; D = hidden size)::

    pos_embed.proj.{weight (D, C, p, p) conv, bias}      -> x_embedder.proj.* (weight flattened to (D, C*p*p))
    pos_embed.pos_embed (1, T*T, D)                      -> checked to be the sin-cos table, not stored
    time_text_embed.timestep_embedder.linear_{1,2}.*     -> t_embedder.mlp.{0,2}.*
    time_text_embed.text_embedder.linear_{1,2}.*         -> pooled_embedder.{0,2}.*
    context_embedder.*                                   -> text_embedder.*
    transformer_blocks.i.norm1.linear.*                  -> blocks.i.adaLN_modulation.1.* (6D, or 9D dual)
    transformer_blocks.i.norm1_context.linear.*          -> blocks.i.text_adaLN_modulation.1.*
    transformer_blocks.i.attn.to_{q,k,v}.*               -> blocks.i.attn.qkv.* (q, k, v)
    transformer_blocks.i.attn.to_out.0.*                 -> blocks.i.attn.proj.*
    transformer_blocks.i.attn.add_{q,k,v}_proj.*         -> blocks.i.attn.text_qkv.* (q, k, v)
    transformer_blocks.i.attn.to_add_out.*               -> blocks.i.attn.text_proj.*
    transformer_blocks.i.attn.norm_{q,k}.weight          -> blocks.i.attn.{q,k}_norm.weight           (qk_norm)
    transformer_blocks.i.attn.norm_added_{q,k}.weight    -> blocks.i.attn.text_{q,k}_norm.weight      (qk_norm)
    transformer_blocks.i.attn2.to_{q,k,v}.*, to_out.0.*  -> blocks.i.attn2.qkv.*, attn2.proj.*        (dual)
    transformer_blocks.i.attn2.norm_{q,k}.weight         -> blocks.i.attn2.{q,k}_norm.weight          (dual, qk_norm)
    transformer_blocks.i.ff.net.0.proj.*, ff.net.2.*     -> blocks.i.mlp.fc1.*, mlp.fc2.*
    transformer_blocks.i.ff_context.net.0.proj.*, .2.*   -> blocks.i.text_mlp.fc1.*, text_mlp.fc2.*
    norm_out.linear.*                                    -> final_layer.adaLN_modulation.1.* (halves swapped)
    proj_out.*                                           -> final_layer.linear.*

The last block is context-pre-only: its ``norm1_context`` is a continuous adaLN with 2D outputs in the order
(scale, shift), stored by patchflow as (shift, scale) like ``norm_out``; it has no ``to_add_out`` or ``ff_context``.
diffusers still computes text queries there (``add_q_proj``, ``norm_added_q``) and throws away what they produce, so
patchflow keeps only the text keys and values of that block: on import those two tensors must be present and are
dropped (they cannot change the output); on export they are written as zeros (the RMSNorm weight as ones).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from patchflow.config import (CodecConfig, DataConfig, FlowConfig, RunConfig, SampleConfig, TextConfig, from_dict,
                              tomllib)
from patchflow.convert.dit import DIFFUSERS_WEIGHTS, _check_out_dir, load_diffusers_dit
from patchflow.models.embed import CroppedPositions
from patchflow.models.mmdit import MMDiT
from patchflow.models.text_config import MMDiTConfig
from patchflow.lora.run import sampling_weights
from patchflow.run_dir import load_run_config
from patchflow.weights import atomic_save_safetensors, atomic_write_text, layout_mismatch

__all__ = ["diffusers_sd3_to_patchflow", "export_diffusers_sd3", "import_diffusers_sd3", "patchflow_to_diffusers_sd3"]

SD3_CLASS = "SD3Transformer2DModel"
# SD3Transformer2DModel's constructor defaults: from_pretrained fills a key missing from config.json with these
SD3_DEFAULTS = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
    "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
    "qk_norm": None,
}
QK_NORMS = {None: False, "rms_norm": True}  # diffusers' qk_norm -> MMDiTConfig.qk_norm
POS_EMBED_ATOL = 1e-5
SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length (CLIPs: their 77 positions)
SD3_SAMPLING = {"sampler": "euler", "steps": 28, "guidance": 7.0}  # StableDiffusion3Pipeline's defaults
SD3_SHIFT = 3.0  # the flow shift of SD3's and SD3.5's schedulers, when the folder has no scheduler config


# ------------------------------------------------------------------------------------------------ the name map


@dataclass(frozen=True)
class Link:
    """One patchflow tensor and the diffusers tensors it is made of.

    how: "copy"; "cat" (theirs concatenated on dim 0, in order); "swap" (2 halves on dim 0 in the other order:
    diffusers' (scale, shift) is patchflow's (shift, scale)); "conv" (a Conv2d weight (D, C, p, p) that patchflow
    holds flattened as a Linear weight (D, C*p*p)).
    """

    ours: str
    theirs: tuple[str, ...]
    how: str = "copy"


def _linear(ours: str, theirs, how: str = "copy") -> list[Link]:
    """Weight and bias of a Linear: theirs is a prefix or a tuple of prefixes (concatenated)."""
    prefixes = (theirs,) if isinstance(theirs, str) else tuple(theirs)
    return [Link(f"{ours}.{kind}", tuple(f"{p}.{kind}" for p in prefixes), how) for kind in ("weight", "bias")]


def sd3_links(cfg: MMDiTConfig) -> list[Link]:
    """Every patchflow tensor of an MMDiT config and its diffusers source (see the module docstring)."""
    links = [Link("x_embedder.proj.weight", ("pos_embed.proj.weight",), "conv"),
             Link("x_embedder.proj.bias", ("pos_embed.proj.bias",))]
    links += _linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    links += _linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    links += _linear("pooled_embedder.0", "time_text_embed.text_embedder.linear_1")
    links += _linear("pooled_embedder.2", "time_text_embed.text_embedder.linear_2")
    links += _linear("text_embedder", "context_embedder")
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        last, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
        text_parts = "kv" if last else "qkv"  # the last block's text queries are never read
        links += _linear(ours + "adaLN_modulation.1", theirs + "norm1.linear")
        links += _linear(ours + "text_adaLN_modulation.1", theirs + "norm1_context.linear", "swap" if last else "copy")
        links += _linear(ours + "attn.qkv", [f"{theirs}attn.to_{p}" for p in "qkv"], "cat")
        links += _linear(ours + "attn.proj", theirs + "attn.to_out.0")
        links += _linear(ours + "attn.text_qkv", [f"{theirs}attn.add_{p}_proj" for p in text_parts], "cat")
        links += _linear(ours + "mlp.fc1", theirs + "ff.net.0.proj")
        links += _linear(ours + "mlp.fc2", theirs + "ff.net.2")
        norms = [("attn.q_norm", "attn.norm_q"), ("attn.k_norm", "attn.norm_k"),
                 ("attn.text_k_norm", "attn.norm_added_k")]
        if not last:
            links += _linear(ours + "attn.text_proj", theirs + "attn.to_add_out")
            links += _linear(ours + "text_mlp.fc1", theirs + "ff_context.net.0.proj")
            links += _linear(ours + "text_mlp.fc2", theirs + "ff_context.net.2")
            norms.append(("attn.text_q_norm", "attn.norm_added_q"))
        if dual:
            links += _linear(ours + "attn2.qkv", [f"{theirs}attn2.to_{p}" for p in "qkv"], "cat")
            links += _linear(ours + "attn2.proj", theirs + "attn2.to_out.0")
            norms += [("attn2.q_norm", "attn2.norm_q"), ("attn2.k_norm", "attn2.norm_k")]
        if cfg.qk_norm:
            links += [Link(f"{ours}{a}.weight", (f"{theirs}{b}.weight",)) for a, b in norms]
    links += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    links += _linear("final_layer.linear", "proj_out")
    return links


def unused_by_patchflow(cfg: MMDiTConfig) -> dict[str, tuple[tuple[int, ...], float]]:
    """diffusers tensors with no patchflow counterpart -> (shape, the value export fills them with): the last block's
    text query projection (and its RMSNorm), whose output diffusers discards. The position table is separate."""
    d, pre = cfg.hidden_size, f"transformer_blocks.{cfg.depth - 1}.attn."
    extra = {pre + "add_q_proj.weight": ((d, d), 0.0), pre + "add_q_proj.bias": ((d,), 0.0)}
    if cfg.qk_norm:
        extra[pre + "norm_added_q.weight"] = ((d // cfg.num_heads,), 1.0)
    return extra


def _our_shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """patchflow's state-dict shapes, from a model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _their_shapes(cfg: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers checkpoint's keys and shapes for a config, derived from patchflow's through the links."""
    ours = _our_shapes(cfg)
    shapes = {}
    for link in sd3_links(cfg):
        shape = ours[link.ours]
        if link.how == "cat":
            shape = (shape[0] // len(link.theirs), *shape[1:])
        elif link.how == "conv":
            shape = (shape[0], cfg.in_channels, cfg.patch_size, cfg.patch_size)
        shapes.update({key: shape for key in link.theirs})
    shapes.update({key: shape for key, (shape, _) in unused_by_patchflow(cfg).items()})
    shapes["pos_embed.pos_embed"] = (1, cfg.pos_table_size ** 2, cfg.hidden_size)
    return shapes


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def position_table(cfg: MMDiTConfig) -> Tensor:
    """The whole (1, T*T, D) sin-cos table diffusers stores as pos_embed.pos_embed."""
    table = cfg.pos_table_size
    return CroppedPositions(cfg.hidden_size, table, cfg.grid)(table, table)


# ------------------------------------------------------------------------------------------------ configs


def config_from_diffusers(config: dict, source: str = "diffusers SD3") -> MMDiTConfig:
    """An SD3Transformer2DModel config.json dict -> MMDiTConfig; ValueError names what patchflow cannot hold."""
    name = config.get("_class_name", SD3_CLASS)
    if name != SD3_CLASS:
        raise ValueError(f"{source}: config.json _class_name = {name!r}; expected {SD3_CLASS!r} (an SD3 transformer)")
    get = {key: config.get(key, default) for key, default in SD3_DEFAULTS.items()}
    if get["out_channels"] is None:  # diffusers reads a null out_channels as in_channels
        get["out_channels"] = get["in_channels"]
    ints = [k for k in SD3_DEFAULTS if k not in ("dual_attention_layers", "qk_norm", "pos_embed_max_size")]
    for key in ints:
        if not isinstance(get[key], int) or isinstance(get[key], bool):
            raise ValueError(f"{source}: config.json {key} = {get[key]!r} is not an integer")
    pos_max = get["pos_embed_max_size"]
    if not isinstance(pos_max, int) or isinstance(pos_max, bool) or pos_max < 1:
        raise ValueError(f"{source}: config.json pos_embed_max_size = {pos_max!r}; patchflow crops a fixed position "
                         "table, so it needs a positive integer (null means interpolated positions, not supported)")
    if get["qk_norm"] not in QK_NORMS:
        raise ValueError(f"{source}: config.json qk_norm = {get['qk_norm']!r}; patchflow's MMDiT has RMSNorm on "
                         "queries and keys (\"rms_norm\") or none (null)")
    dual = get["dual_attention_layers"]
    if not isinstance(dual, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dual):
        raise ValueError(f"{source}: config.json dual_attention_layers = {dual!r} must be a list of block indices")
    hidden = get["num_attention_heads"] * get["attention_head_dim"]
    if get["out_channels"] != get["in_channels"]:
        raise ValueError(f"{source}: out_channels = {get['out_channels']} differs from in_channels = "
                         f"{get['in_channels']}; patchflow's MMDiT predicts a velocity shaped like its input")
    if get["caption_projection_dim"] != hidden:
        raise ValueError(f"{source}: caption_projection_dim = {get['caption_projection_dim']} differs from the hidden "
                         f"size num_attention_heads * attention_head_dim = {hidden}; patchflow's text stream has the "
                         "image stream's width")
    cfg = MMDiTConfig(
        arch="mmdit", input_size=get["sample_size"], frames=1, in_channels=get["in_channels"],
        patch_size=get["patch_size"], hidden_size=hidden, depth=get["num_layers"],
        num_heads=get["num_attention_heads"], mlp_ratio=4.0, text_dim=get["joint_attention_dim"],
        pooled_dim=get["pooled_projection_dim"], qk_norm=QK_NORMS[get["qk_norm"]],
        dual_attention_layers=sorted(set(dual)), pos_embed_max_size=pos_max,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{source}: config.json describes an MMDiT patchflow cannot build: {e}") from None
    return cfg


def config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """MMDiTConfig -> an SD3Transformer2DModel config.json dict; ValueError for what diffusers cannot hold."""
    if cfg.arch != "mmdit":
        raise ValueError(f"model.arch = {cfg.arch!r}: only an MMDiT (model.arch = \"mmdit\") exports to "
                         f"{SD3_CLASS}")
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"model.mlp_ratio = {cfg.mlp_ratio}: {SD3_CLASS} has MLPs 4x the hidden size; only "
                         "mlp_ratio = 4 exports")
    if cfg.frames != 1:
        raise ValueError(f"model.frames = {cfg.frames}: {SD3_CLASS} is an image model (frames = 1)")
    out = {"_class_name": SD3_CLASS}
    try:
        from importlib.metadata import version

        out["_diffusers_version"] = version("diffusers")
    except Exception:  # not installed here: the key is informational
        pass
    out.update({
        "sample_size": cfg.input_size, "patch_size": cfg.patch_size, "in_channels": cfg.in_channels,
        "num_layers": cfg.depth, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.text_dim,
        "caption_projection_dim": cfg.hidden_size, "pooled_projection_dim": cfg.pooled_dim,
        "out_channels": cfg.in_channels, "pos_embed_max_size": cfg.pos_table_size,
        "dual_attention_layers": sorted(cfg.dual_attention_layers), "qk_norm": "rms_norm" if cfg.qk_norm else None,
    })
    return out


# ------------------------------------------------------------------------------------------------ weights


def diffusers_sd3_to_patchflow(state_dict: dict[str, Tensor], config: dict,
                               source: str = "diffusers SD3") -> tuple[MMDiTConfig, dict[str, Tensor]]:
    """SD3Transformer2DModel tensors + its config.json dict -> (MMDiTConfig, patchflow state dict, float32).

    Strict: a missing, unexpected or misshapen key, or a stored position table that is not the sin-cos table,
    raises ValueError naming it.
    """
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{source}: expected a non-empty dict of tensors, got {type(state_dict).__name__}")
    cfg = config_from_diffusers(config, source)
    problem = layout_mismatch(state_dict, _their_shapes(cfg))
    if problem:
        raise ValueError(f"{source} does not have the {SD3_CLASS} layout its config.json describes; {problem}")
    table = state_dict["pos_embed.pos_embed"].detach()
    # a checkpoint saved in fp16 / bf16 holds the table rounded to that dtype (values in [-1, 1])
    atol = max(POS_EMBED_ATOL, torch.finfo(table.dtype).eps) if table.is_floating_point() else POS_EMBED_ATOL
    diff = (table.float() - position_table(cfg)).abs().max().item()
    if not diff <= atol:
        raise ValueError(f"{source}: pos_embed.pos_embed is not the fixed 2D sin-cos table of "
                         f"{cfg.pos_table_size}x{cfg.pos_table_size} patches (max abs difference {diff:.3g} > "
                         f"{atol:.3g}); patchflow computes positions and cannot hold a learned table")
    weights = {}
    for link in sd3_links(cfg):
        parts = [state_dict[key].detach() for key in link.theirs]
        if link.how == "cat":
            value = torch.cat(parts)
        elif link.how == "swap":
            value = _swap_halves(parts[0])
        elif link.how == "conv":
            value = parts[0].reshape(parts[0].shape[0], -1)  # (D, C, p, p) -> (D, C*p*p) in (c, ph, pw) order
        else:
            value = parts[0]
        weights[link.ours] = value.to(torch.float32).contiguous()
    problem = layout_mismatch(weights, _our_shapes(cfg))
    if problem:  # the links and the model disagree: a bug here, not in the checkpoint
        raise ValueError(f"{source} (after mapping to patchflow names): {problem}")
    return cfg, weights


def patchflow_to_diffusers_sd3(weights: dict[str, Tensor], cfg: MMDiTConfig,
                               source: str = "patchflow MMDiT") -> tuple[dict, dict[str, Tensor]]:
    """patchflow MMDiT state dict -> (SD3Transformer2DModel config.json dict, its tensors, float32)."""
    config = config_to_diffusers(cfg)
    problem = layout_mismatch(weights, _our_shapes(cfg))
    if problem:
        raise ValueError(f"{source} does not match its config's MMDiT; {problem}")
    out = {}
    for link in sd3_links(cfg):
        value = weights[link.ours].detach().to(torch.float32)
        if link.how == "cat":
            out.update(zip(link.theirs, value.chunk(len(link.theirs))))
        elif link.how == "swap":
            out[link.theirs[0]] = _swap_halves(value)
        elif link.how == "conv":
            out[link.theirs[0]] = value.reshape(value.shape[0], cfg.in_channels, cfg.patch_size, cfg.patch_size)
        else:
            out[link.theirs[0]] = value
    for key, (shape, fill) in unused_by_patchflow(cfg).items():
        out[key] = torch.full(shape, fill)
    out["pos_embed.pos_embed"] = position_table(cfg)
    return config, {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ folders


def _model_folder(src) -> Path:
    """The folder holding the transformer's config.json: src, or src/transformer for a pipeline folder."""
    d = Path(src)
    if not d.is_dir():
        raise FileNotFoundError(f"diffusers model folder {d} not found")
    if not (d / "config.json").is_file() and (d / "transformer" / "config.json").is_file():
        d = d / "transformer"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; pass the folder that {SD3_CLASS}.save_pretrained wrote "
                                "(or a pipeline folder with a transformer/ subfolder)")
    return d


def _flow_shift(src: Path) -> float:
    """The pipeline's scheduler shift when src is a pipeline folder that has one, else SD3's 3.0."""
    path = src / "scheduler" / "scheduler_config.json"
    try:
        shift = json.loads(path.read_text()).get("shift", SD3_SHIFT)
    except (OSError, ValueError, AttributeError):
        return SD3_SHIFT
    return float(shift) if isinstance(shift, (int, float)) and shift > 0 else SD3_SHIFT


def _pipeline_parts(src: Path, cfg: MMDiTConfig) -> dict:
    """A whole SD3 pipeline folder -> its [text] and [codec] settings: the three text encoders (each with its
    tokenizer_N folder), joined and padded SD3's way, and its vae/. {} for a lone transformer folder."""
    src = src.expanduser().resolve()
    folders = [src / name for name in SD3_TEXT_ENCODERS]
    if not (src / "model_index.json").is_file():
        return {}
    missing = [f.name for f in folders if not (f / "config.json").is_file()]
    if missing:
        warnings.warn(f"{src} has no {', '.join(missing)}: the run names MiniLM and no codec as placeholders (SD3 "
                      f"without T5 pads with zeros, which patchflow does not); set text.encoder, text.max_length, "
                      f"text.padding and codec.source to sample it", stacklevel=3)
        return {}
    if any("," in str(f) for f in folders):
        raise ValueError(f"{src}: a path with a comma cannot name text encoders ([text] encoder is comma-separated);"
                         f" move or rename the pipeline folder")
    clip_l, clip_g, t5 = (json.loads((f / "config.json").read_text()) for f in folders)
    try:
        width = max(clip_l["hidden_size"] + clip_g["hidden_size"], t5["d_model"])  # joined as text/joint.py does
        pooled = clip_l["projection_dim"] + clip_g["projection_dim"]
    except KeyError as e:
        raise ValueError(f"{src}: its text encoders are not two CLIPs with projection and a T5 ({e.args[0]} is "
                         f"missing from a config.json)") from None
    if (width, pooled) != (cfg.text_dim, cfg.pooled_dim):
        raise ValueError(f"{src}: its text encoders give {width}-wide tokens and {pooled}-wide pooled vectors, its "
                         f"transformer takes {cfg.text_dim} and {cfg.pooled_dim}; the folder mixes models")
    parts = {"text": TextConfig(encoder=",".join(map(str, folders)), max_length=SD3_T5_LENGTH, padding="max_length")}
    if (src / "vae" / "config.json").is_file():
        parts["codec"] = CodecConfig(source=str(src / "vae"))
    return parts


def _run_config(cfg: MMDiTConfig, shift: float, parts: dict | None = None) -> RunConfig:
    """A rectified flow sampled like StableDiffusion3Pipeline: 28 Euler steps, guidance 7, the scheduler's shift;
    parts: a pipeline folder's [text] and [codec] (_pipeline_parts). [data] names a built-in captioned world only so
    the config validates; fine-tuning needs a data set set."""
    run = RunConfig(model=cfg, flow=FlowConfig(objective="rectified", shift=shift),
                    data=DataConfig(dataset="color-digits"), sample=SampleConfig(**SD3_SAMPLING),
                    **(parts or {})).validate()
    from_dict(tomllib.loads(run.to_toml()))  # what patchflow.load will read must parse back
    return run


def import_diffusers_sd3(src, out_dir, pipeline=None) -> Path:
    """diffusers SD3 transformer folder (or pipeline folder) -> patchflow run directory `out_dir`; returns its path.

    Writes config.toml (model.arch = "mmdit", flow.objective = "rectified"), model.safetensors and ema.safetensors
    (the same float32 weights); config.toml last, so a directory with one is complete. The text encoders, VAE and
    scheduler shift come from `pipeline` (a StableDiffusion3Pipeline folder) when given, else from src when it is
    a pipeline folder; a lone transformer gets MiniLM and no codec as placeholders.
    """
    out = _check_out_dir(out_dir)
    folder = _model_folder(src)
    around = Path(src if pipeline is None else pipeline)
    if pipeline is not None and not (around / "model_index.json").is_file():
        raise FileNotFoundError(f"--pipeline {around}: not a diffusers pipeline folder (no model_index.json); pass "
                                f"the folder StableDiffusion3Pipeline.save_pretrained wrote")
    config, state_dict = load_diffusers_dit(folder)  # config.json + single or sharded safetensors; .bin refused
    cfg, weights = diffusers_sd3_to_patchflow(state_dict, config, source=str(folder))
    toml = _run_config(cfg, _flow_shift(around), _pipeline_parts(around, cfg)).to_toml()
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "converted_from": f"diffusers-sd3:{Path(src).name}"}
    atomic_save_safetensors(weights, out / "model.safetensors", metadata=metadata)
    atomic_save_safetensors(weights, out / "ema.safetensors", metadata=metadata)
    atomic_write_text(out / "config.toml", toml)
    return out


def export_diffusers_sd3(run_dir, out_dir, ema: bool = True) -> Path:
    """patchflow MMDiT run -> a folder SD3Transformer2DModel.from_pretrained loads (config.json and
    diffusion_pytorch_model.safetensors, float32); EMA weights unless ema=False. Returns the folder."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a model (config.json exists); choose a new output directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    cfg = load_run_config(run_dir)
    if cfg.model.arch != "mmdit":
        raise ValueError(f"{run_dir} is a model.arch = {cfg.model.arch!r} run; only MMDiT runs (model.arch = "
                         f"\"mmdit\") export to {SD3_CLASS}")
    weights, _, path = sampling_weights(run_dir, cfg, ema)  # a LoRA run: its adapter merged into its base
    config, tensors = patchflow_to_diffusers_sd3(weights, cfg.model, source=str(path))
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, out / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out
