"""Adapter files other tools read, and back: diffusers/PEFT and kohya/ComfyUI.

- **diffusers** (MMDiT): `pytorch_lora_weights.safetensors` as `StableDiffusion3Pipeline.save_lora_weights` writes
  it: `transformer.<diffusers module>.lora_A.weight` (rank, in) / `.lora_B.weight` (out, rank), no `.default`, no
  `base_model.model`, and `lora_adapter_metadata` (PEFT's LoraConfig: r, lora_alpha, target_modules) in the
  metadata, so `SD3Transformer2DModel.load_lora_adapter` and `StableDiffusion3Pipeline.load_lora_weights` load it.
  alpha / rank is baked into lora_B and lora_alpha = r is written, because diffusers reads the metadata on some
  paths only (`load_lora_adapter(file)` skips it unless `use_safetensors=True`; PEFT's default alpha is r): every
  path then computes the same function.
- **kohya** (MMDiT, DiT): `lora_unet_<original checkpoint name, "." -> "_">.lora_down.weight` / `.lora_up.weight`
  and a per-module `.alpha`, on the original SD3 names (`convert/sd3_original.py`) or official DiT's, which
  ComfyUI and sd-scripts read.

patchflow fuses q, k, v into one Linear where diffusers has three: the export shares the down projection and
splits the up rows (exact); an import of three separately trained adapters stacks them into one of rank
r_q + r_k + r_v (block-diagonal up, exact). Each foreign module's alpha / rank is baked into the imported up
weights, so an imported adapter has scale 1.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from patchflow.checks import ConfigError
from patchflow.lora.adapters import DOWN, UP, layers_of
from patchflow.lora.files import Adapter

FORMATS = ("patchflow", "diffusers", "kohya")
DIFFUSERS_PREFIX, KOHYA_PREFIX = "transformer.", "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the adapter's LoraConfig in the file metadata
BASE_HASH_KEY = "patchflow_base_hash"   # carried in foreign files so an import still checks its base


@dataclass(frozen=True)
class Part:
    """A foreign module fed by rows [start, stop) of one patchflow Linear."""
    name: str
    start: int
    stop: int
    how: str = "copy"  # "swap": halves in the other order; "conv": a Conv2d; "pad_q": zero rows before ours


def _parts(links, out_rows: dict[str, int]) -> dict[str, list[Part]]:
    """patchflow Linear name -> its foreign parts, from a converter's weight links; out_rows: each Linear's rows."""
    table = {}
    for link in links:
        if not link.ours.endswith(".weight") or link.ours[:-7] not in out_rows:
            continue
        layer, n = link.ours[:-7], len(link.theirs)
        rows = out_rows[layer] // n
        table[layer] = [Part(t[:-7], k * rows, (k + 1) * rows, "copy" if link.how == "cat" else link.how)
                        for k, t in enumerate(link.theirs)]
    return table


def part_table(model_cfg, fmt: str) -> dict[str, list[Part]]:
    """Every patchflow Linear of a model config and the modules it is in the format (ConfigError where the format
    does not hold this kind of model)."""
    from patchflow.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    rows = {name: m.out_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    arch = model_cfg.arch
    if arch == "mmdit" and fmt == "diffusers":
        from patchflow.convert.sd3 import sd3_links
        return _parts(sd3_links(model_cfg), rows)
    if arch == "mmdit" and fmt == "kohya":
        from patchflow.convert.sd3_original import original_links
        return _parts(original_links(model_cfg), rows)
    if arch == "dit" and fmt == "kohya" and model_cfg.frames == 1:  # official DiT's names are patchflow's
        return {name: [Part(name, 0, n, "conv" if name == "x_embedder.proj" else "copy")] for name, n in rows.items()}
    raise ConfigError(f"--format {fmt} holds {'SD3 (mmdit)' if fmt == 'diffusers' else 'SD3 (mmdit) and image DiT'} "
                      f"adapters; this is a model.arch = {arch!r} model: export it as --format patchflow")


def _conv_shape(model_cfg) -> tuple[int, int, int]:
    return model_cfg.in_channels, model_cfg.patch_size, model_cfg.patch_size


def _swap(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _kohya_name(module: str) -> str:
    return KOHYA_PREFIX + module.replace(".", "_")


def export(adapter: Adapter, model_cfg, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A patchflow adapter -> (tensors, metadata) of a diffusers or kohya file."""
    table = part_table(model_cfg, fmt)
    tensors, modules = {}, []
    for layer in layers_of(adapter.weights):
        if layer not in table:
            raise ConfigError(f"the adapter's layer {layer!r} has no counterpart in the {fmt} format")
        down, up = adapter.weights[layer + DOWN], adapter.weights[layer + UP]
        for part in table[layer]:
            a, b = down.clone(), up[part.start:part.stop]  # each part its own copy of a shared down
            if part.how == "swap":
                b = _swap(b)
            elif part.how == "pad_q":
                b = torch.cat([b.new_zeros((b.shape[0] // 2, b.shape[1])), b])
            elif part.how == "conv":
                a, b = a.reshape(a.shape[0], *_conv_shape(model_cfg)), b[:, :, None, None]
            if fmt == "diffusers":  # alpha / rank baked into B (lora_alpha = r): see the module docstring
                b, key = b * adapter.scale, DIFFUSERS_PREFIX + part.name
                tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a.contiguous(), b.contiguous()
            else:
                key = _kohya_name(part.name)
                tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = a.contiguous(), b.contiguous()
                tensors[key + ".alpha"] = torch.tensor(float(adapter.alpha))
            modules.append(part.name)
    meta = {"format": "pt", BASE_HASH_KEY: adapter.base_hash}
    if fmt == "diffusers":
        config = {"r": adapter.rank, "lora_alpha": adapter.rank, "target_modules": sorted(modules),
                  "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False}
        meta[METADATA_KEY] = json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()}, sort_keys=True)
    else:
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(adapter.rank),
                    ss_network_alpha=repr(float(adapter.alpha)))
    return tensors, meta


# ------------------------------------------------------------------------------------------------ reading


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet_.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def detect(keys) -> str:
    """The format of an adapter file's keys: "kohya", "diffusers" or "patchflow"."""
    keys = list(keys)
    if keys and all(_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    if keys and all(_PEFT_KEY.match(k) for k in keys):
        return "diffusers"
    return "patchflow"


def _foreign_modules(tensors: dict, meta: dict, fmt: str, source: str) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Foreign module name -> (down, up, alpha / rank) of a diffusers or kohya file."""
    found: dict[str, dict] = {}
    pattern = _KOHYA_KEY if fmt == "kohya" else _PEFT_KEY
    for key, value in tensors.items():
        name, what = pattern.match(key).groups()
        found.setdefault(name, {})[{"A": "down", "B": "up", "lora_down.weight": "down",
                                    "lora_up.weight": "up", "alpha": "alpha"}[what]] = value
    config = {}
    if fmt == "diffusers" and meta.get(METADATA_KEY):
        raw = json.loads(meta[METADATA_KEY])
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items()}
    out = {}
    for name, parts in found.items():
        if "down" not in parts or "up" not in parts:
            raise ConfigError(f"{source}: module {name!r} has only {sorted(parts)} (an adapter needs down and up)")
        rank = parts["down"].shape[0]
        if fmt == "kohya":  # kohya's convention: no alpha tensor means alpha = rank
            alpha = float(parts["alpha"]) if "alpha" in parts else rank
        else:  # PEFT's: lora_alpha (per-module in alpha_pattern), else alpha = rank
            alpha = float(config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", rank)))
        out[name] = (parts["down"], parts["up"], alpha / rank)
    return out


def import_adapter(tensors: dict, meta: dict, model_cfg, fmt: str, source: str) -> Adapter:
    """A diffusers or kohya file's tensors -> a patchflow Adapter (scale 1) for a model config; a module this model
    does not have, or of another shape, is refused."""
    foreign = _foreign_modules(tensors, meta, fmt, source)
    table = part_table(model_cfg, fmt)
    lookup = {(_kohya_name(p.name) if fmt == "kohya" else p.name): (layer, p)
              for layer, parts in table.items() for p in parts}
    unknown = sorted(set(foreign) - set(lookup))
    if unknown:
        raise ConfigError(f"{source}: modules this {model_cfg.arch} model does not have: {unknown[:4]}"
                          f"{' ...' if len(unknown) > 4 else ''} (an adapter for another model)")
    by_layer: dict[str, list] = {}
    for name, (down, up, scale) in foreign.items():
        layer, part = lookup[name]
        if part.how == "conv":
            down, up = down.flatten(1), up.flatten(1)
        up = up.float() * scale
        if part.how == "swap":
            up = _swap(up)
        elif part.how == "pad_q":
            up = up[up.shape[0] // 3:]
        if up.shape[0] != part.stop - part.start or up.shape[1] != down.shape[0]:
            raise ConfigError(f"{source}: module {name!r} has up {tuple(up.shape)} and down {tuple(down.shape)}; "
                              f"this model needs {part.stop - part.start} output rows (an adapter for another model)")
        by_layer.setdefault(layer, []).append((part, down.float(), up))
    weights, ranks = {}, []
    for layer, pieces in by_layer.items():
        rows = table[layer][-1].stop
        downs = [d for _, d, _ in pieces]
        if len(pieces) == len(table[layer]) and all(torch.equal(d, downs[0]) for d in downs):
            down = downs[0]  # one shared down projection (how patchflow exports a fused layer)
            up = torch.zeros(rows, down.shape[0])
            for part, _, u in pieces:
                up[part.start:part.stop] = u
        else:  # independent adapters per part: stacked, block-diagonal
            down = torch.cat(downs)
            up, col = torch.zeros(rows, down.shape[0]), 0
            for part, d, u in pieces:
                up[part.start:part.stop, col:col + d.shape[0]] = u
                col += d.shape[0]
        weights[layer + DOWN], weights[layer + UP] = down.contiguous(), up.contiguous()
        ranks.append(down.shape[0])
    rank = max(set(ranks), key=ranks.count)
    return Adapter(weights, rank, float(rank), base_hash=meta.get(BASE_HASH_KEY, ""), arch=model_cfg.arch)
