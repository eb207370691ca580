"""`patchflow plan`: parameters, FLOPs and training memory per batch size, and the largest batch that fits.

Activation memory is measured, not guessed: one forward of a 1- and a 2-block copy of the model at the
real resolution and precision records every tensor autograd saves for backward (saved_tensors_hooks),
which gives the bytes of the stem and of each block per sample; the full model is stem + depth x block.
Weights, gradients, AdamW's two moments and the EMA are fp32 (16 + 4 bytes per parameter); parameters that
autograd saves are not counted twice.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from patchflow.config import RunConfig
from patchflow.flops import dit_forward_macs, run_forward_macs
from patchflow.models import build_model, example_inputs

BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weights, gradients, AdamW moments, EMA copy


def parse_memory(text: str) -> int:
    """'80GB' / '80GiB' / '24G' / '512MB' -> bytes (GB read as GiB, as GPU makers' '80GB' cards are ~80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--memory must look like 80GB, 24GiB or 512MB, got {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _saved_bytes(model: nn.Module, cfg: RunConfig, batch: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    args, kwargs = example_inputs(cfg.model, batch, random=True)
    # "auto" is planned as bf16: what it picks on a GPU with bf16, the machines a memory plan is for
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.precision in ("bf16", "auto")
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.train()(*args, **kwargs)
    return sum(seen.values())


@dataclass
class Part:
    """Saved bytes of a piece of the model: a batch-independent part (autocast weight copies) + per sample."""
    fixed: float
    per_sample: float

    def at(self, batch: int) -> float:
        return self.fixed + batch * self.per_sample


@dataclass
class Plan:
    params: int
    forward_macs: int
    stem: Part           # everything outside the blocks
    block: Part          # one block
    block_input: Part    # what a checkpointed block keeps in forward
    depth: int

    def activation_bytes(self, batch: int, checkpoint_every: int = 0) -> float:
        """Peak saved activations: with checkpointing every k-th block keeps only its input, and one block's
        activations are rebuilt at a time in backward."""
        if checkpoint_every <= 0:
            return self.stem.at(batch) + self.depth * self.block.at(batch)
        recomputed = -(-self.depth // checkpoint_every)
        kept = self.depth - recomputed
        return (self.stem.at(batch) + kept * self.block.at(batch) + recomputed * self.block_input.at(batch)
                + self.block.at(batch))

    def memory(self, batch: int, checkpoint_every: int = 0) -> float:
        return self.params * BYTES_PER_PARAM + self.activation_bytes(batch, checkpoint_every)

    def largest_batch(self, budget: float, checkpoint_every: int = 0) -> int:
        free = budget - self.memory(0, checkpoint_every)
        return max(0, int(free // (self.memory(1, checkpoint_every) - self.memory(0, checkpoint_every))))


def make_plan(cfg: RunConfig) -> Plan:
    """Measure saved bytes of 1- and 2-block models (plain and checkpointed) at batch 1 and 2, and
    extrapolate to the full depth."""
    m = cfg.model

    def at_depth(depth: int) -> nn.Module:
        return build_model(dataclasses.replace(m, depth=depth))

    with torch.device("meta"):  # count first: the measurement builds two real 1- and 2-block copies
        full = build_model(cfg.model)
        params = sum(p.numel() for p in full.parameters())
        one_block = at_depth(1)
    block_params = sum(p.numel() for p in one_block.blocks[0].parameters())
    needed = 4 * 2 * (3 * sum(p.numel() for p in one_block.parameters()) + 3 * block_params)  # fp32 copies, x2
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available / 2:
        raise ValueError(f"patchflow plan measures 1- and 2-block copies of this model on the CPU, which needs "
                         f"about {needed / 2**30:.1f} GiB; only {available / 2**30:.1f} GiB is free here")
    small = {d: at_depth(d) for d in (1, 2)}
    checkpointed = copy.deepcopy(small[2])
    checkpointed.checkpoint_every = 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        f = {(d, b): _saved_bytes(small[d], cfg, b) for d in (1, 2) for b in (1, 2)}
        ckpt = {b: _saved_bytes(checkpointed, cfg, b) for b in (1, 2)}

    def part(at1: float, at2: float) -> Part:
        return Part(fixed=2 * at1 - at2, per_sample=at2 - at1)

    one, two = part(f[1, 1], f[1, 2]), part(f[2, 1], f[2, 2])
    block = Part(two.fixed - one.fixed, two.per_sample - one.per_sample)
    stem = Part(one.fixed - block.fixed, one.per_sample - block.per_sample)
    both_inputs = part(ckpt[1], ckpt[2])
    block_input = Part((both_inputs.fixed - stem.fixed) / 2, (both_inputs.per_sample - stem.per_sample) / 2)
    return Plan(params=params, forward_macs=run_forward_macs(cfg, full),
                stem=stem, block=block, block_input=block_input,
                depth=m.depth)


def format_plan(cfg: RunConfig, plan: Plan, memory: int | None, batches: list[int],
                checkpoint_every: int = 1) -> str:
    gib = 2**30
    m = cfg.model
    lines = [
        f"model: {getattr(m, 'preset', '') or m.arch.upper()}  depth {m.depth}, hidden {m.hidden_size}, heads {m.num_heads}, patch {m.patch_size}, "
        f"latent {m.in_channels}x{m.frames}x{m.input_size}x{m.input_size}, precision {cfg.train.precision}",
        f"parameters: {plan.params:,} ({plan.params / 1e6:.1f}M); weights + grads + AdamW + EMA: "
        f"{plan.params * BYTES_PER_PARAM / gib:.2f} GiB",
        f"forward per sample: {plan.forward_macs / 1e9:.2f} GMACs = {2 * plan.forward_macs / 1e9:.2f} GFLOPs; "
        f"training step ~ {6 * plan.forward_macs / 1e9:.2f} GFLOPs per sample",
        f"activations per sample (measured): {(plan.activation_bytes(1) - plan.activation_bytes(0)) / 2**20:.1f} MiB; "
        f"with activation checkpointing every {checkpoint_every} block(s): "
        f"{(plan.activation_bytes(1, checkpoint_every) - plan.activation_bytes(0, checkpoint_every)) / 2**20:.1f} MiB; "
        f"batch-independent (autocast weight copies): {plan.activation_bytes(0) / 2**30:.2f} GiB",
        "",
        f"{'batch':>8} {'memory GiB':>12} {'checkpointed GiB':>18}",
    ]
    for b in batches:
        lines.append(f"{b:>8} {plan.memory(b) / gib:>12.2f} {plan.memory(b, checkpoint_every) / gib:>18.2f}")
    if memory:
        lines += ["", f"largest batch in {memory / gib:.1f} GiB: {plan.largest_batch(memory)} without checkpointing, "
                      f"{plan.largest_batch(memory, checkpoint_every)} with checkpointing every {checkpoint_every}"]
    lines.append("(estimates exclude framework workspace and fragmentation: keep ~10% headroom)")
    return "\n".join(lines)
