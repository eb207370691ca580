"""Random draws made for the whole global batch (world x local) of which each rank keeps its own slice, so a run on
N processes sees exactly the noise, timesteps and dropout that one process with the same global batch would.
Imports only torch: the objectives, guidance, text encoders and codecs all draw this way."""
from __future__ import annotations

import torch


def shard_draw(batch: int, shard: tuple[int, int], draw, dim: int = 0) -> torch.Tensor:
    """draw(batch * world) for the global batch, cut to this rank's `batch` entries along `dim` (shard: rank, world)."""
    rank, world = shard
    return draw(batch * world).narrow(dim, rank * batch, batch)


def global_draw(x0: torch.Tensor, generator, shard: tuple[int, int], draw) -> torch.Tensor:
    """shard_draw for a batch x0 (B, ...): draw(n) -> (n, ...), of which this rank keeps B rows. The objectives' form;
    `generator` is unused (`draw` closes over it) and stays for the callers."""
    return shard_draw(x0.shape[0], shard, draw)


def global_coins(rows: tuple[int, ...], batch: int, prob: float, shard: tuple[int, int],
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(*rows, batch) bool, each True with probability `prob`: uniforms (*rows, batch * world), this rank's columns.
    prob <= 0 draws nothing (all False), so the generator's stream is the same as with no dropout at all."""
    if prob <= 0:
        return torch.zeros(*rows, batch, dtype=torch.bool, device=device)
    uniforms = shard_draw(batch, shard, lambda n: torch.rand(*rows, n, generator=generator, device=device), len(rows))
    return uniforms < prob
