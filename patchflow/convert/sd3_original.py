"""Stability's original SD3 checkpoint names (the MMDiT reference code's, which single-file checkpoints, ComfyUI and
kohya's LoRA files use) for patchflow's MMDiT tensors.

The original names are patchflow's with the streams spelled out (block i; D = hidden size)::

    blocks.i.{attn.qkv, attn.proj, mlp.*, adaLN_modulation.1, attn2.*}  -> joint_blocks.i.x_block.<same>
    blocks.i.attn.{q,k}_norm, attn2.{q,k}_norm                          -> joint_blocks.i.x_block.attn{,2}.ln_{q,k}
    blocks.i.attn.text_qkv, text_proj, text_{q,k}_norm                  -> joint_blocks.i.context_block.attn.{qkv, proj, ln_{q,k}}
    blocks.i.text_mlp.*, text_adaLN_modulation.1                        -> joint_blocks.i.context_block.{mlp.*, adaLN_modulation.1}
    pooled_embedder.{0,2}                                               -> y_embedder.mlp.{0,2}
    text_embedder                                                       -> context_embedder
    x_embedder.proj (weight flattened)                                  -> x_embedder.proj (a Conv2d weight (D, C, p, p))
    t_embedder.*, final_layer.*                                         -> the same

Both sides order adaLN chunks the same way (shift first), unlike diffusers. The last block's context qkv has all
three projections there (3D rows); patchflow keeps only its keys and values (the queries are never read), so they
are the rows after the first D ("pad_q": zeros before them on export), and its ln_q is ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from patchflow.convert.sd3 import Link, _linear, _our_shapes, position_table
from patchflow.models.text_config import MMDiTConfig
from patchflow.weights import layout_mismatch

__all__ = ["original_links", "patchflow_to_original_sd3"]


def original_links(cfg: MMDiTConfig) -> list[Link]:
    """Every patchflow tensor of an MMDiT config and its name in an original SD3 checkpoint (see the docstring);
    how: "copy", "conv" (flattened <-> Conv2d weight) or "pad_q" (ours are the last D*2 rows of theirs)."""
    links = [Link("x_embedder.proj.weight", ("x_embedder.proj.weight",), "conv"),
             Link("x_embedder.proj.bias", ("x_embedder.proj.bias",))]
    for ours, theirs in (("t_embedder.mlp.0", "t_embedder.mlp.0"), ("t_embedder.mlp.2", "t_embedder.mlp.2"),
                         ("pooled_embedder.0", "y_embedder.mlp.0"), ("pooled_embedder.2", "y_embedder.mlp.2"),
                         ("text_embedder", "context_embedder")):
        links += _linear(ours, theirs)
    for i in range(cfg.depth):
        ours, x, c = f"blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == cfg.depth - 1
        pairs = [("adaLN_modulation.1", x + "adaLN_modulation.1"), ("attn.qkv", x + "attn.qkv"),
                 ("attn.proj", x + "attn.proj"), ("mlp.fc1", x + "mlp.fc1"), ("mlp.fc2", x + "mlp.fc2"),
                 ("text_adaLN_modulation.1", c + "adaLN_modulation.1")]
        norms = [("attn.q_norm", x + "attn.ln_q"), ("attn.k_norm", x + "attn.ln_k"),
                 ("attn.text_k_norm", c + "attn.ln_k")]
        if not last:
            pairs += [("attn.text_qkv", c + "attn.qkv"), ("attn.text_proj", c + "attn.proj"),
                      ("text_mlp.fc1", c + "mlp.fc1"), ("text_mlp.fc2", c + "mlp.fc2")]
            norms.append(("attn.text_q_norm", c + "attn.ln_q"))
        else:
            links += _linear(ours + "attn.text_qkv", c + "attn.qkv", "pad_q")
        if i in cfg.dual_attention_layers:
            pairs += [("attn2.qkv", x + "attn2.qkv"), ("attn2.proj", x + "attn2.proj")]
            norms += [("attn2.q_norm", x + "attn2.ln_q"), ("attn2.k_norm", x + "attn2.ln_k")]
        for a, b in pairs:
            links += _linear(ours + a, b)
        if cfg.qk_norm:
            links += [Link(f"{ours}{a}.weight", (f"{b}.weight",)) for a, b in norms]
    links += _linear("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
    links += _linear("final_layer.linear", "final_layer.linear")
    return links


def patchflow_to_original_sd3(weights: dict[str, Tensor], cfg: MMDiTConfig) -> dict[str, Tensor]:
    """patchflow MMDiT state dict -> an original SD3 checkpoint's tensors (float32), the position table included."""
    problem = layout_mismatch(weights, _our_shapes(cfg))
    if problem:
        raise ValueError(f"patchflow MMDiT weights do not match their config; {problem}")
    d, out = cfg.hidden_size, {}
    for link in original_links(cfg):
        value = weights[link.ours].detach().to(torch.float32)
        if link.how == "conv":
            value = value.reshape(d, cfg.in_channels, cfg.patch_size, cfg.patch_size)
        elif link.how == "pad_q":
            value = torch.cat([value.new_zeros((d, *value.shape[1:])), value])
        out[link.theirs[0]] = value.contiguous()
    if cfg.qk_norm:  # the last block's unused text-query norm
        out[f"joint_blocks.{cfg.depth - 1}.context_block.attn.ln_q.weight"] = torch.ones(d // cfg.num_heads)
    out["pos_embed"] = position_table(cfg)
    return out
