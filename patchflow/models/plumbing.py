"""How the diffusion transformers run their blocks: activation checkpointing of every k-th block, torch.compile of
each block with the batch and token dims marked dynamic, and the hidden states REPA aligns. DiT, MMDiT, CrossDiT and
VideoDiT share it."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


class BlockRunner:
    """Mixin for a model (an nn.Module) whose blocks sit in the ModuleLists named by `block_lists`.

    checkpoint_every: 0 none, 1 every block, k every k-th block (blocks 0, k, 2k, ...); the trainer sets it.
    compiled: True after compile_blocks(); forward then marks its block inputs' batch and token dims dynamic.
    align_after: REPA (patchflow.repa): after this block (1-based; 0 none) a training forward passes the image tokens
        through the module `repa_projector` the trainer attached and keeps the result in `aligned` (B, N, D_enc).
    """

    block_lists: tuple[str, ...] = ("blocks",)
    checkpoint_every: int = 0
    compiled: bool = False
    align_after: int = 0

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block (kwargs go to `Module.compile`). forward marks the batch and token dims of the
        blocks' inputs dynamic, so new resolutions, frame counts, prompt lengths and batch sizes reuse the graphs
        instead of compiling again per shape."""
        for name in self.block_lists:
            for block in getattr(self, name) or ():  # None: a list this config does not build
                block.compile(**kwargs)
        self.compiled = True

    def mark_dynamic(self, *marks) -> None:
        """marks: (tensor or None, dim, dim, ...). Once compiled, each dim named is marked dynamic, so the first
        call already compiles for any size there (dynamo would otherwise recompile once on the second size)."""
        if not self.compiled:
            return
        for tensor, *dims in marks:
            if tensor is not None:
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)

    def run_block(self, i: int, block, *args):
        """block(*args), block `i` of its list; under autograd every checkpoint_every-th block keeps only its inputs
        and recomputes its activations in backward (same numbers, less memory)."""
        k = self.checkpoint_every
        if k > 0 and i % k == 0 and torch.is_grad_enabled():
            out = checkpoint(block, *args, use_reentrant=False)
        else:
            out = block(*args)
        if i + 1 == self.align_after and self.training and torch.is_grad_enabled():
            self.aligned = self.repa_projector(out[0] if isinstance(out, tuple) else out)  # joint blocks: (image, text)
        return out
