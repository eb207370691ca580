"""Batches of clips of different sizes: buckets by (T, H, W), and packing under a token budget.

Both samplers follow `ResumableBatchSampler`: endless batches of item indices, batch b a pure function of
(seed, b), so a run resumed at batch b sees exactly the data it would have; `start` is where iteration begins;
`shard = (rank, world)` gives each process its part. Both are `torch.utils.data.Sampler`s for the
`batch_sampler=` of a DataLoader.

- `BucketBatchSampler`: every batch holds items of one (T, H, W), so it stacks into a dense tensor; each bucket
  has its own (global) batch size, and N processes together see exactly what one process sees.
- `PackedBatchSampler`: differently sized items in one pack whose token count is at most `max_tokens`, for a
  model that runs a pack as one sequence with a block-diagonal attention mask (NaViT).
- `padding_waste`: the share of tokens that padding a batch to its longest item would waste.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Callable, Iterable, Sequence

import torch

Size = tuple[int, int, int]  # (frames, height, width)

EXAMPLE = "[[1, 32, 32, 64], [9, 32, 32, 16]]"


def _generator(*parts: int) -> torch.Generator:
    """A generator seeded from (seed, epoch[, bucket]); (seed, epoch) seeds as ResumableBatchSampler does."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p) % (1 << 63)
    return torch.Generator().manual_seed(h)


def _show(size: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in size)


@dataclass(frozen=True)
class Bucket:
    """Items of size (frames, height, width) in batches of `batch_size` (the global batch, over all processes)."""

    frames: int
    height: int
    width: int
    batch_size: int
    weight: float = 1.0  # how likely an item that fits several buckets is cut to this one (assign_sizes)

    @property
    def size(self) -> Size:
        return self.frames, self.height, self.width

    @property
    def entry(self) -> list:
        """The bucket as written in data.buckets."""
        head = [self.frames, self.height, self.width, self.batch_size]
        return head if self.weight == 1.0 else head + [self.weight]


def parse_buckets(table) -> list[Bucket]:
    """The buckets of `data.buckets`: a list of [frames, height, width, batch_size] lists, as TOML gives it,
    e.g. [[1, 32, 32, 64], [9, 32, 32, 16]] (images as one-frame clips in batches of 64, 9-frame clips in 16s).
    An entry may end with a weight > 0, [frames, height, width, batch_size, weight] (default 1): how likely a clip
    that fits several buckets is cut to this one (`assign_sizes`).

    ValueError, naming data.buckets, every bad entry and how to fix it: not a list, empty, an entry that is not
    4 integers, a size below 1, a batch size below 1, two entries of the same (T, H, W).
    """
    if isinstance(table, (str, bytes, Mapping)) or not isinstance(table, Sequence):
        raise ValueError(f"data.buckets must be a list of [frames, height, width, batch_size] lists, "
                         f"e.g. data.buckets = {EXAMPLE}; got {table!r}")
    if not table:
        raise ValueError(f"data.buckets is empty; give at least one [frames, height, width, batch_size] entry, "
                         f"e.g. data.buckets = {EXAMPLE}")
    problems, buckets, first = [], [], {}
    for i, entry in enumerate(table):
        where = f"data.buckets entry {i} ({entry!r})"
        if isinstance(entry, (str, bytes, Mapping)) or not isinstance(entry, Sequence) or len(entry) not in (4, 5):
            problems.append(f"{where} must be 4 positive integers [frames, height, width, batch_size], "
                            f"e.g. [9, 32, 32, 16], optionally with a weight > 0 after them")
            continue
        weight = 1.0
        if len(entry) == 5:
            weight, entry = entry[4], entry[:4]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                problems.append(f"{where}: the weight {weight!r} must be a number > 0")
                continue
        names = ("frames", "height", "width", "batch_size")
        bad = [f"{name} {v!r} is not an integer" for name, v in zip(names, entry)
               if isinstance(v, bool) or not isinstance(v, Integral)]
        if bad:
            problems.append(f"{where}: {', '.join(bad)}; give 4 positive integers [frames, height, width, "
                            f"batch_size], e.g. [9, 32, 32, 16]")
            continue
        t, h, w, bs = (int(v) for v in entry)
        small = [f"{name} {v} must be >= 1" for name, v in zip(names[:3], (t, h, w)) if v < 1]
        if small:
            problems.append(f"{where}: {', '.join(small)}; sizes are positive (an image is a 1-frame clip: "
                            f"frames = 1)")
        if bs < 1:
            problems.append(f"{where}: batch_size {bs} must be >= 1; give the bucket at least one item per "
                            f"batch, or remove the entry")
        if small or bs < 1:
            continue
        if (t, h, w) in first:
            problems.append(f"data.buckets entries {first[t, h, w]} and {i} ({entry!r}) both have size "
                            f"{_show((t, h, w))} (frames x height x width); a size takes one bucket: keep one "
                            f"entry with the batch size you want")
            continue
        first[t, h, w] = i
        buckets.append(Bucket(t, h, w, bs, float(weight)))
    if problems:
        raise ValueError("\n".join(problems))
    return buckets


def _counts(sizes: Mapping | Iterable) -> Counter:
    if isinstance(sizes, Mapping):
        return Counter({tuple(int(n) for n in s): int(c) for s, c in sizes.items()})
    return Counter(tuple(int(n) for n in s) for s in sizes)


def _available(counts: Counter) -> str:
    return ", ".join(f"{_show(s)} ({c} item{'s' * (c != 1)})" for s, c in sorted(counts.items()))


def check_buckets(buckets: Sequence[Bucket], sizes_available, patch: Sequence[int] = (1, 1, 1),
                  codec_ok: Callable | None = None, world: int = 1,
                  latent: Callable[[Size], Sequence[int]] | None = None) -> None:
    """Checks at start that the buckets can run on this data, model and number of processes; one ValueError
    naming data.buckets and every problem at once, else None.

    sizes_available: the size (T, H, W) of every item (a list with repeats, e.g. a sampler's `sizes`), or a
    {size: item count} mapping. Every bucket must have at least one full batch of items (a bucket with no items
    names the sizes the data has), and every item's size must be in a bucket.
    patch: (pt, ph, pw); it must divide every bucket's latent size, `latent(size)` (None: the bucket sizes are
    already the latent sizes the model patchifies, e.g. of a latent cache).
    codec_ok: None, or called with a bucket's (T, H, W); True or None: the codec takes that size; False or a
    str (the reason): it does not.
    world: the number of processes; every batch size (a global batch) must be divisible by it.
    """
    counts = _counts(sizes_available)
    problems = []
    for b in buckets:
        where = f"data.buckets entry {b.entry}"
        n = counts.get(b.size, 0)
        if n == 0:
            problems.append(f"{where}: no item of the data has size {_show(b.size)} (frames x height x width); "
                            f"the data has sizes {_available(counts) or 'none (it is empty)'}; remove the entry "
                            f"or change its size to one of these")
        elif n < b.batch_size:
            problems.append(f"{where}: the data has {n} item{'s' * (n != 1)} of size {_show(b.size)}, fewer "
                            f"than one batch of {b.batch_size}; lower its batch size to at most {n} or add data")
        if b.batch_size % world:
            lo = b.batch_size // world * world
            fix = f"{lo} or {lo + world}" if lo else f"{world}"
            problems.append(f"{where}: batch size {b.batch_size} (the global batch) is not divisible by the "
                            f"{world} processes; make it a multiple of {world}, e.g. {fix}")
        if codec_ok is not None:
            ok = codec_ok(b.size)
            if ok is False or isinstance(ok, str):
                why = f": {ok}" if isinstance(ok, str) and ok else ""
                problems.append(f"{where}: the codec cannot encode clips of size {_show(b.size)}{why}; choose a "
                                f"size it takes")
                continue
        lat = tuple(int(n) for n in (latent(b.size) if latent is not None else b.size))
        if any(n % p for n, p in zip(lat, patch)):
            what = f"its latent size {_show(lat)}" if latent is not None else f"its size {_show(lat)}"
            fix = ("choose a size whose latent is a multiple of the patch" if latent is not None else
                   f"e.g. {_show(tuple(max(p, n // p * p) for n, p in zip(lat, patch)))}")
            problems.append(f"{where}: {what} is not divisible by the patch {_show(patch)} (pt x ph x pw); "
                            f"{fix}")
    in_none = {s: c for s, c in counts.items() if s not in {b.size for b in buckets}}
    if in_none:
        problems.append(_unbucketed(in_none))
    if problems:
        raise ValueError("\n".join(problems))


def _unbucketed(in_none: Mapping[Size, int]) -> str:
    n = sum(in_none.values())
    return (f"data.buckets: {n} item{'s' * (n != 1)} of the data have a size in no bucket: "
            f"{_available(Counter(in_none))}; add a bucket for each size or leave these items out of the data")


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of indices, each of items of one size (T, H, W), so each stacks into a dense tensor.

    Items are grouped by exact size into the buckets; item sizes in no bucket are a ValueError here. Epoch e:
    bucket k's items are permuted by a generator seeded from (seed, e, k) and cut into full batches of that
    bucket's batch size (its partial batch dropped); then the list of the batches of all buckets is shuffled by a
    generator seeded from (seed, e). Every epoch has the same number of batches, `per_epoch`.

    Batch b is a pure function of (seed, b); `batch(b)` is the global batch, `bucket(b)` its bucket. A bucket's
    batch size is the global batch; with shard = (rank, world) each process gets its contiguous slice
    (rank*local : (rank+1)*local, local = that bucket's batch size // world), so N processes together see exactly
    what one process sees, whatever N is.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], buckets: Sequence[Bucket] | Sequence[Sequence[int]],
                 seed: int = 0, start: int = 0, shard: tuple[int, int] = (0, 1)):
        buckets = parse_buckets([b.entry if isinstance(b, Bucket) else b for b in buckets])
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        sizes = [tuple(int(n) for n in s) for s in sizes]
        of_size = {b.size: k for k, b in enumerate(buckets)}
        in_none = Counter(s for s in sizes if s not in of_size)
        if in_none:
            raise ValueError(_unbucketed(in_none))
        members = [[] for _ in buckets]
        for i, s in enumerate(sizes):
            members[of_size[s]].append(i)
        for b, m in zip(buckets, members):
            if len(m) < b.batch_size:
                raise ValueError(f"data.buckets entry {b.entry}: the data has {len(m)} item{'s' * (len(m) != 1)} "
                                 f"of size {_show(b.size)}, fewer than one batch of {b.batch_size}; lower its "
                                 f"batch size to at most {len(m)}, add data, or remove the entry")
            if b.batch_size % world:
                raise ValueError(f"data.buckets entry {b.entry}: batch size {b.batch_size} (the global batch) is "
                                 f"not divisible by the {world} processes")
        self.sizes, self.buckets, self.seed, self.start = sizes, buckets, seed, start
        self.rank, self.world = rank, world
        self.members = [torch.tensor(m, dtype=torch.long) for m in members]
        self.per_epoch = sum(len(m) // b.batch_size for b, m in zip(buckets, members))

    def _epoch_batches(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        if getattr(self, "_epoch", None) != epoch:  # one list of batches per epoch, not per batch
            batches = []
            for k, (b, m) in enumerate(zip(self.buckets, self.members)):
                items = m[torch.randperm(len(m), generator=_generator(self.seed, epoch, k))]
                full = len(m) // b.batch_size * b.batch_size
                batches += [(k, row) for row in items[:full].view(-1, b.batch_size)]
            order = torch.randperm(len(batches), generator=_generator(self.seed, epoch))
            self._epoch, self._cached = epoch, [batches[j] for j in order.tolist()]
        return self._cached

    def bucket(self, b: int) -> Bucket:
        """The bucket of batch b (the size of its items and its global batch size)."""
        epoch, offset = divmod(b, self.per_epoch)
        return self.buckets[self._epoch_batches(epoch)[offset][0]]

    def batch(self, b: int) -> list[int]:
        """Global batch b: its bucket's batch size indices of items of that bucket's size."""
        epoch, offset = divmod(b, self.per_epoch)
        return self._epoch_batches(epoch)[offset][1].tolist()

    def __iter__(self):
        b = self.start
        while True:
            items = self.batch(b)
            local = len(items) // self.world
            yield items[self.rank * local:(self.rank + 1) * local]
            b += 1


class PackedBatchSampler(torch.utils.data.Sampler):
    """Endless packs of indices of differently sized items, each pack at most `max_tokens` tokens in all.

    Epoch e: a permutation of the items seeded by (seed, e), then greedy filling in permutation order: a pack
    takes the next item while its sum stays <= max_tokens, else the pack is closed and the item starts the next
    one (next fit; an item larger than max_tokens is a ValueError here). An epoch's packs take every item exactly
    once; their number varies by epoch. The packs of all epochs, in order, form one endless stream, the same
    for any number of processes.

    `max_tokens` bounds one process's pack (its sequence length, what its memory must hold). With
    shard = (rank, world), step b gives process r pack b*world + r of the stream: every process gets a whole pack
    (so at least one item, and at most max_tokens tokens), and the packs are similarly full, as greedy filling
    leaves each short of max_tokens by less than the item that did not fit. So the union over ranks of step b
    cannot be the same for every world size (with a per-process budget, N processes take N packs a step), but
    the stream is: the N processes of step b see exactly what one process sees in steps b*N .. b*N + N - 1, and a
    run can resume on M processes at step k*N/M when M divides k*N. Guaranteed, and tested: step b is a pure
    function of (seed, b, world); the ranks of a step are disjoint, except that a step whose packs straddle an
    epoch boundary (world > 1) may hold an item twice, once from each epoch; every item is in at most (exactly)
    one pack per epoch.

    `batch(b)` is step b's items, rank by rank; `packs(b)` the `world` packs of step b. Packs are cached one
    epoch at a time (the current one), as ResumableBatchSampler caches its permutation; finding the epoch of
    step b packs the epochs before it once (counts kept), a few milliseconds each.
    """

    def __init__(self, tokens: Sequence[int], max_tokens: int, seed: int = 0, start: int = 0,
                 shard: tuple[int, int] = (0, 1)):
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("the data set is empty; there is nothing to pack")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        small = [i for i, t in enumerate(tokens) if t < 1]
        if small:
            raise ValueError(f"{len(small)} item(s) have fewer than 1 token, e.g. item {small[0]} "
                             f"({tokens[small[0]]} tokens); every item must have >= 1 token")
        big = [i for i, t in enumerate(tokens) if t > max_tokens]
        if big:
            largest = max(big, key=lambda i: tokens[i])
            raise ValueError(f"{len(big)} item(s) have more than max_tokens = {max_tokens} tokens, e.g. item "
                             f"{big[0]} ({tokens[big[0]]} tokens), the largest item {largest} "
                             f"({tokens[largest]} tokens); raise max_tokens to at least {tokens[largest]} or "
                             f"leave such items out")
        self.tokens, self.max_tokens, self.seed, self.start = tokens, max_tokens, seed, start
        self.rank, self.world = rank, world
        self._ends = []  # _ends[e]: the number of packs in epochs 0..e

    def _packing(self, epoch: int) -> tuple[torch.Tensor, list[int]]:
        """(the permutation of epoch e, the start of each of its packs in it and its length at the end)."""
        if getattr(self, "_epoch", None) != epoch:  # one packing per epoch, not per batch
            perm = torch.randperm(len(self.tokens), generator=_generator(self.seed, epoch))
            sums = [0] + torch.tensor(self.tokens)[perm].cumsum(0).tolist()
            bounds, s = [0], 0
            while s < len(perm):  # the pack from s ends before the first item that would pass max_tokens
                s = bisect.bisect_right(sums, sums[s] + self.max_tokens) - 1
                bounds.append(s)
            self._epoch, self._cached = epoch, (perm, bounds)
        return self._cached

    def _locate(self, m: int) -> tuple[int, int]:
        """(epoch, pack within it) of pack m of the endless stream."""
        while not self._ends or self._ends[-1] <= m:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self._packing(len(self._ends))[1]) - 1)
        epoch = bisect.bisect_right(self._ends, m)
        return epoch, m - (self._ends[epoch - 1] if epoch else 0)

    def pack(self, m: int) -> list[int]:
        """Pack m of the endless stream (the pack of step m with one process)."""
        epoch, k = self._locate(m)
        perm, bounds = self._packing(epoch)
        return perm[bounds[k]:bounds[k + 1]].tolist()

    def packs(self, b: int) -> list[list[int]]:
        """The `world` packs of step b, rank by rank."""
        return [self.pack(b * self.world + r) for r in range(self.world)]

    def batch(self, b: int) -> list[int]:
        """Every item of step b, over all ranks, rank by rank."""
        return [i for p in self.packs(b) for i in p]

    def __iter__(self):
        b = self.start
        while True:
            yield self.pack(b * self.world + self.rank)
            b += 1


def padding_waste(sizes: Sequence, batch: Sequence[int]) -> float:
    """The share of the tokens of `batch` (item indices) that padding every item to the longest would waste:
    1 - sum(n_i) / (len(batch) * max(n_i)), n_i item i's token count: sizes[i] itself if an int, else the
    product of its (T, H, W) (in patches, or in pixels: the share is the same when the patch divides them).
    0 for a batch of one size; 0.0 for an empty batch."""
    n = [s if isinstance(s, Integral) else math.prod(s) for s in (sizes[i] for i in batch)]
    if not n:
        return 0.0
    return 1.0 - sum(n) / (len(n) * max(n))


def assign_sizes(native: Sequence[Sequence[int]], buckets: Sequence[Bucket], seed: int = 0) -> list[Size]:
    """The size each item trains at: item i of native size (T, H, W) goes to one bucket of the same H and W and at
    most T frames (its first frames are kept), drawn with the buckets' weights from a generator seeded by
    (seed, i) -- fixed for the data, whatever the run. Images (T = 1) go to one-frame buckets; clips may be cut to
    shorter durations, Open-Sora's variable-duration buckets. ValueError naming the sizes no bucket can take."""
    out, missing = [], Counter()
    for i, size in enumerate(native):
        t, h, w = (int(n) for n in size)
        fits = [b for b in buckets if b.height == h and b.width == w and b.frames <= t]
        if not fits:
            missing[(t, h, w)] += 1
            continue
        if len(fits) == 1:
            out.append(fits[0].size)
            continue
        weights = torch.tensor([b.weight for b in fits], dtype=torch.float64)
        k = int(torch.multinomial(weights, 1, generator=_generator(seed, i, 7)))
        out.append(fits[k].size)
    if missing:
        raise ValueError(f"data.buckets: no bucket takes {sum(missing.values())} items of the data (a bucket takes "
                         f"items of its height and width with at least its frames): sizes "
                         f"{_available(missing)}; add a bucket for them")
    return out


class CutClips(torch.utils.data.Dataset):
    """Items (x[:, :frames[i]], y) of a data set whose x is (C, T, H, W): each item cut to its first frames."""

    def __init__(self, dataset, frames: Sequence[int]):
        if len(frames) != len(dataset):
            raise ValueError(f"{len(frames)} frame counts for {len(dataset)} items")
        self.dataset, self.frames = dataset, list(frames)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x[:, :self.frames[i]], y


def collate_list(batch):
    """A packed batch: a list of differently sized x and a list of their targets (labels or captions)."""
    xs, ys = zip(*batch)
    return list(xs), (list(ys) if isinstance(ys[0], str) else torch.as_tensor(ys))
