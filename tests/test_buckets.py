"""Bucketed and packed batch order (patchflow.data.buckets): table parsing and checks, exact resume, shards, the
token bound of packs, padding waste. Index lists only, no data; the whole file runs in about a second."""
from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest
import torch

from patchflow.data.buckets import (Bucket, BucketBatchSampler, PackedBatchSampler, check_buckets, padding_waste,
                                    parse_buckets)

IMAGE, CLIP, WIDE = (1, 32, 32), (9, 32, 32), (5, 16, 32)
TABLE = [[1, 32, 32, 8], [9, 32, 32, 4], [5, 16, 32, 2]]


def mixed_sizes(n_image=50, n_clip=21, n_wide=9):
    """Item sizes interleaved (items of one size are not contiguous): 50 images, 21 clips, 9 wide clips."""
    sizes = [IMAGE] * n_image + [CLIP] * n_clip + [WIDE] * n_wide
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(123)).tolist()
    return [sizes[j] for j in order]


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


# ---- parse_buckets ------------------------------------------------------------------------------------------
def test_parse_buckets_gives_buckets_in_table_order():
    assert parse_buckets([[1, 32, 32, 64], [9, 32, 32, 16]]) == [Bucket(1, 32, 32, 64), Bucket(9, 32, 32, 16)]
    b = parse_buckets([(9, 16, 32, 4)])[0]
    assert (b.size, b.batch_size, b.entry) == ((9, 16, 32), 4, [9, 16, 32, 4])
    with pytest.raises(Exception):
        b.frames = 2  # frozen


@pytest.mark.parametrize("table, words", [
    ({"a": 1}, ["data.buckets must be a list", "[[1, 32, 32, 64], [9, 32, 32, 16]]"]),
    ([], ["data.buckets is empty", "at least one"]),
    ([[1, 32, 32]], ["data.buckets entry 0 ([1, 32, 32])", "4 positive integers",
                     "[frames, height, width, batch_size]"]),
    ([[1, 32, 32, 8, 2, 1]], ["entry 0 ([1, 32, 32, 8, 2, 1])", "4 positive integers"]),
    ([[1, 32, 32, 8, 0]], ["entry 0 ([1, 32, 32, 8, 0])", "weight 0 must be a number > 0"]),
    ([[1, 32, 32, 8], 7], ["entry 1 (7)", "4 positive integers"]),
    ([[1, 32.5, 32, 8]], ["entry 0 ([1, 32.5, 32, 8])", "height 32.5 is not an integer"]),
    ([[1, 32, 32, True]], ["batch_size True is not an integer"]),
    ([[1, 32, "32", 8]], ["width '32' is not an integer"]),
    ([[0, 32, 32, 8]], ["entry 0 ([0, 32, 32, 8])", "frames 0 must be >= 1", "frames = 1"]),
    ([[1, 32, -4, 8]], ["width -4 must be >= 1"]),
    ([[1, 32, 32, 8], [9, 32, 32, 0]], ["entry 1 ([9, 32, 32, 0])", "batch_size 0 must be >= 1", "remove the entry"]),
    ([[1, 32, 32, 8], [9, 32, 32, 4], [1, 32, 32, 16]],
     ["entries 0 and 2 ([1, 32, 32, 16])", "size 1x32x32", "keep one entry"]),
])
def test_parse_buckets_errors_name_the_key_the_entry_and_the_fix(table, words):
    with pytest.raises(ValueError) as e:
        parse_buckets(table)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_parse_buckets_reports_every_bad_entry_at_once():
    with pytest.raises(ValueError) as e:
        parse_buckets([[0, 32, 32, 8], [9, 32, 32, 0], [9, 32]])
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and [l.split(" (")[0] for l in lines] == [
        "data.buckets entry 0", "data.buckets entry 1", "data.buckets entry 2"]


# ---- check_buckets ------------------------------------------------------------------------------------------
def test_check_buckets_passes_a_good_table():
    sizes = mixed_sizes()
    assert check_buckets(parse_buckets(TABLE), sizes, patch=(1, 2, 2), world=2) is None
    assert check_buckets(parse_buckets(TABLE), Counter(sizes), patch=(1, 2, 2), codec_ok=lambda s: True) is None


def test_check_buckets_bucket_without_items_names_the_sizes_the_data_has():
    with pytest.raises(ValueError) as e:
        check_buckets(parse_buckets(TABLE + [[17, 32, 32, 2]]), mixed_sizes())
    msg = str(e.value)
    assert "data.buckets entry [17, 32, 32, 2]: no item of the data has size 17x32x32" in msg
    assert "the data has sizes 1x32x32 (50 items), 5x16x32 (9 items), 9x32x32 (21 items)" in msg
    assert len(msg.splitlines()) == 1


def test_check_buckets_fewer_items_than_a_batch():
    with pytest.raises(ValueError, match=r"entry \[5, 16, 32, 16\]: the data has 9 items of size 5x16x32, fewer "
                                         r"than one batch of 16; lower its batch size to at most 9"):
        check_buckets(parse_buckets([[1, 32, 32, 8], [9, 32, 32, 4], [5, 16, 32, 16]]), mixed_sizes())


def test_check_buckets_patch_must_divide_the_latent_size():
    with pytest.raises(ValueError) as e:
        check_buckets(parse_buckets(TABLE), mixed_sizes(), patch=(2, 2, 2))
    lines = str(e.value).splitlines()
    assert lines == [
        "data.buckets entry [1, 32, 32, 8]: its size 1x32x32 is not divisible by the patch 2x2x2 (pt x ph x pw); "
        "e.g. 2x32x32",
        "data.buckets entry [9, 32, 32, 4]: its size 9x32x32 is not divisible by the patch 2x2x2 (pt x ph x pw); "
        "e.g. 8x32x32",
        "data.buckets entry [5, 16, 32, 2]: its size 5x16x32 is not divisible by the patch 2x2x2 (pt x ph x pw); "
        "e.g. 4x16x32",
    ]
    # a causal codec: 1 + 4k frames -> 1 + k latent frames, 8x space; the patch divides the latent
    latent = lambda s: (1 + (s[0] - 1) // 4, s[1] // 8, s[2] // 8)  # noqa: E731
    check_buckets(parse_buckets(TABLE), mixed_sizes(), patch=(1, 2, 2), latent=latent)  # 1x4x4, 3x4x4, 2x2x4
    with pytest.raises(ValueError, match=r"entry \[9, 32, 32, 4\]: its latent size 3x4x4 is not divisible by the "
                                         r"patch 2x2x2"):
        check_buckets(parse_buckets([[9, 32, 32, 4]]), [CLIP] * 4, patch=(2, 2, 2), latent=latent)


def test_check_buckets_codec_and_world():
    codec_ok = lambda s: True if (s[0] - 1) % 4 == 0 else f"frames must be 1 + 4k, got {s[0]}"  # noqa: E731
    with pytest.raises(ValueError) as e:
        check_buckets(parse_buckets([[1, 32, 32, 8], [6, 32, 32, 3]]), [IMAGE] * 8 + [(6, 32, 32)] * 3,
                      codec_ok=codec_ok, world=2)
    lines = str(e.value).splitlines()
    assert lines == [
        "data.buckets entry [6, 32, 32, 3]: batch size 3 (the global batch) is not divisible by the 2 processes; "
        "make it a multiple of 2, e.g. 2 or 4",
        "data.buckets entry [6, 32, 32, 3]: the codec cannot encode clips of size 6x32x32: frames must be 1 + 4k, "
        "got 6; choose a size it takes",
    ]
    with pytest.raises(ValueError, match="cannot encode clips of size 1x32x32; choose"):
        check_buckets(parse_buckets([[1, 32, 32, 8]]), [IMAGE] * 8, codec_ok=lambda s: False)


def test_check_buckets_and_sampler_refuse_items_in_no_bucket():
    sizes = mixed_sizes() + [(3, 8, 8)] * 2 + [(2, 8, 8)]
    want = "data.buckets: 3 items of the data have a size in no bucket: 2x8x8 (1 item), 3x8x8 (2 items)"
    with pytest.raises(ValueError, match=re.escape(want)):
        check_buckets(parse_buckets(TABLE), sizes)
    with pytest.raises(ValueError, match=re.escape(want)):
        BucketBatchSampler(sizes, parse_buckets(TABLE))


def test_sampler_refuses_a_bucket_without_a_full_batch_and_indivisible_batches():
    with pytest.raises(ValueError, match=r"entry \[17, 32, 32, 2\]: the data has 0 items of size 17x32x32"):
        BucketBatchSampler(mixed_sizes(), parse_buckets(TABLE + [[17, 32, 32, 2]]))
    with pytest.raises(ValueError, match=r"entry \[5, 16, 32, 2\]: batch size 2 .* not divisible by the 4 processes"):
        BucketBatchSampler(mixed_sizes(), parse_buckets(TABLE), shard=(0, 4))
    with pytest.raises(ValueError, match="batch_size 0 must be >= 1"):
        BucketBatchSampler(mixed_sizes(), [Bucket(1, 32, 32, 0)])


# ---- BucketBatchSampler -------------------------------------------------------------------------------------
def test_bucket_batches_hold_one_size_with_that_buckets_batch_size():
    sizes = mixed_sizes()
    s = BucketBatchSampler(sizes, parse_buckets(TABLE), seed=3)
    assert s.per_epoch == 50 // 8 + 21 // 4 + 9 // 2 == 15
    per_bucket = Counter()
    for b in range(2 * s.per_epoch):
        items, bucket = s.batch(b), s.bucket(b)
        assert {sizes[i] for i in items} == {bucket.size}
        assert len(items) == bucket.batch_size == {IMAGE: 8, CLIP: 4, WIDE: 2}[bucket.size]
        per_bucket[bucket.size] += 1
    assert per_bucket == {IMAGE: 12, CLIP: 10, WIDE: 8}  # 6, 5, 4 full batches each epoch
    # the DataLoader view: every batch stacks into a dense tensor
    data = [torch.zeros(3, *size) for size in sizes]
    loader = torch.utils.data.DataLoader(data, batch_sampler=BucketBatchSampler(sizes, parse_buckets(TABLE), seed=3))
    shapes = [tuple(x.shape) for x in itertools.islice(loader, 6)]
    assert shapes == [(s.bucket(b).batch_size, 3, *s.bucket(b).size) for b in range(6)]


def test_bucket_every_item_at_most_once_per_epoch_and_epochs_differ():
    sizes = mixed_sizes()
    s = BucketBatchSampler(sizes, parse_buckets(TABLE), seed=0)
    epochs = [[s.batch(e * s.per_epoch + j) for j in range(s.per_epoch)] for e in range(3)]
    for batches in epochs:
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == 48 + 20 + 8  # the partial batch of each bucket dropped
    assert epochs[0] != epochs[1] != epochs[2]
    assert [s.bucket(j).size for j in range(15)] != [s.bucket(15 + j).size for j in range(15)]  # the bucket order too
    other = BucketBatchSampler(sizes, parse_buckets(TABLE), seed=1)
    assert [other.batch(j) for j in range(15)] != epochs[0]


def test_bucket_resume_is_exact_and_batch_is_a_pure_function():
    sizes, table = mixed_sizes(), parse_buckets(TABLE)
    straight = take(BucketBatchSampler(sizes, table, seed=5), 40)  # over two epoch boundaries
    for k in (0, 7, 15, 16, 33):
        assert take(BucketBatchSampler(sizes, table, seed=5, start=k), 40 - k) == straight[k:]
    fresh = BucketBatchSampler(sizes, table, seed=5)
    assert [fresh.batch(b) for b in (33, 2, 17, 2)] == [straight[b] for b in (33, 2, 17, 2)]  # any order


def test_bucket_shards_partition_each_batch_as_one_process_sees_it():
    sizes, table = mixed_sizes(), parse_buckets(TABLE)
    one = take(BucketBatchSampler(sizes, table, seed=2), 30)
    ranks = [take(BucketBatchSampler(sizes, table, seed=2, shard=(r, 2)), 30) for r in range(2)]
    for b in range(30):
        assert ranks[0][b] + ranks[1][b] == one[b]  # contiguous halves, in order
        assert len(ranks[0][b]) == len(ranks[1][b]) == len(one[b]) // 2
    # and resumed on 2 processes at step 11
    assert [take(BucketBatchSampler(sizes, table, seed=2, start=11, shard=(r, 2)), 5) for r in range(2)] == [
        ranks[r][11:16] for r in range(2)]


# ---- PackedBatchSampler -------------------------------------------------------------------------------------
TOKENS = [64] * 40 + [576] * 12 + [160] * 10 + [1000] * 2  # images, 9-frame clips, wide clips, long clips


def test_packs_respect_the_bound_and_take_every_item_once_per_epoch():
    s = PackedBatchSampler(TOKENS, max_tokens=1024, seed=0)
    m, epochs = 0, []
    for e in range(3):
        packs = []
        while sum(len(p) for p in packs) < len(TOKENS):
            packs.append(s.pack(m))
            m += 1
        epochs.append(packs)
        assert sorted(i for p in packs for i in p) == list(range(len(TOKENS)))  # exactly once
        for p in packs:
            assert 1 <= len(p) and sum(TOKENS[i] for i in p) <= 1024
        for p, q in zip(packs, packs[1:]):  # greedy: a pack closes only when the next item does not fit
            assert sum(TOKENS[i] for i in p) + TOKENS[q[0]] > 1024
    assert epochs[0] != epochs[1] != epochs[2]
    assert s._ends[:3] == list(itertools.accumulate(len(p) for p in epochs))
    assert take(s, 5) == [s.batch(b) for b in range(5)] == epochs[0][:5]


def test_packing_is_deterministic_and_resumable():
    straight = take(PackedBatchSampler(TOKENS, 1024, seed=4), 80)  # several epochs
    assert take(PackedBatchSampler(TOKENS, 1024, seed=4), 80) == straight
    assert take(PackedBatchSampler(TOKENS, 1024, seed=5), 80) != straight
    for k in (1, 23, 50, 79):
        assert take(PackedBatchSampler(TOKENS, 1024, seed=4, start=k), 80 - k) == straight[k:]
    fresh = PackedBatchSampler(TOKENS, 1024, seed=4)
    assert [fresh.batch(b) for b in (61, 3, 40)] == [straight[b] for b in (61, 3, 40)]
    # a DataLoader of packs: one sequence per pack, its length the pack's tokens
    loader = torch.utils.data.DataLoader([torch.zeros(t) for t in TOKENS],
                                         batch_sampler=PackedBatchSampler(TOKENS, 1024, seed=4, start=3),
                                         collate_fn=torch.cat)
    assert [len(x) for x in itertools.islice(loader, 4)] == [sum(TOKENS[i] for i in p) for p in straight[3:7]]


def test_packing_shards_world_2():
    one = take(PackedBatchSampler(TOKENS, 1024, seed=6), 60)
    ranks = [take(PackedBatchSampler(TOKENS, 1024, seed=6, shard=(r, 2)), 30) for r in range(2)]
    two = PackedBatchSampler(TOKENS, 1024, seed=6, shard=(0, 2))
    for b in range(30):
        # the same stream: 2 processes at step b see what 1 process sees at steps 2b and 2b+1
        assert ranks[0][b] == one[2 * b] and ranks[1][b] == one[2 * b + 1]
        assert two.packs(b) == [ranks[0][b], ranks[1][b]] and two.batch(b) == ranks[0][b] + ranks[1][b]
        for r in range(2):  # every process gets items, within its own bound
            assert ranks[r][b] and sum(TOKENS[i] for i in ranks[r][b]) <= 1024
    ends = PackedBatchSampler(TOKENS, 1024, seed=6)
    ends.pack(60)
    for b in range(30):
        straddles = any(2 * b < e <= 2 * b + 1 for e in ends._ends)
        if not straddles:  # disjoint ranks (a step across an epoch boundary may repeat an item, once per epoch)
            assert not set(ranks[0][b]) & set(ranks[1][b])
    # deterministic per (seed, b, world), and resumable per rank
    assert take(PackedBatchSampler(TOKENS, 1024, seed=6, shard=(1, 2), start=9), 21) == ranks[1][9:]


def test_packing_errors():
    with pytest.raises(ValueError) as e:
        PackedBatchSampler([10, 2000, 30, 5000], max_tokens=1024)
    msg = str(e.value)
    assert "2 item(s) have more than max_tokens = 1024 tokens, e.g. item 1 (2000 tokens)" in msg
    assert "the largest item 3 (5000 tokens); raise max_tokens to at least 5000" in msg
    with pytest.raises(ValueError, match="item 1 \\(0 tokens\\)"):
        PackedBatchSampler([10, 0], max_tokens=1024)
    with pytest.raises(ValueError, match="empty"):
        PackedBatchSampler([], max_tokens=1024)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        PackedBatchSampler([10], max_tokens=1024, shard=(2, 2))


def test_packing_an_item_of_exactly_max_tokens_is_a_pack_of_its_own():
    tokens = [4, 10, 3, 3]
    for seed in range(5):
        s = PackedBatchSampler(tokens, max_tokens=10, seed=seed)
        s.pack(0)
        packs = [s.pack(m) for m in range(s._ends[0])]  # epoch 0
        assert sorted(i for p in packs for i in p) == [0, 1, 2, 3]
        assert [1] in packs and all(sum(tokens[i] for i in p) <= 10 for p in packs)


# ---- padding_waste ------------------------------------------------------------------------------------------
def test_padding_waste():
    sizes = [IMAGE, CLIP, (9, 32, 32), (5, 16, 32)]
    assert padding_waste(sizes, [0, 1]) == pytest.approx(1 - (1024 + 9216) / (2 * 9216))  # 4/9
    assert padding_waste(sizes, [0, 1]) == pytest.approx(4 / 9)
    assert padding_waste(sizes, [1, 2]) == 0.0
    assert padding_waste(sizes, [0, 3]) == pytest.approx(1 - (1024 + 2560) / (2 * 2560))  # 0.3
    assert padding_waste([64, 576, 576], [0, 1, 2]) == pytest.approx(1 - 1216 / 1728)
    assert padding_waste(sizes, []) == 0.0


def test_a_fifth_value_is_the_bucket_weight():
    from patchflow.data.buckets import parse_buckets

    b = parse_buckets([[1, 32, 32, 8, 2.5], [9, 32, 32, 4]])
    assert b[0].weight == 2.5 and b[1].weight == 1.0
    assert b[0].entry == [1, 32, 32, 8, 2.5] and b[1].entry == [9, 32, 32, 4]


def test_assign_sizes_cuts_clips_to_buckets_by_weight_and_is_fixed_per_item():
    from patchflow.data.buckets import assign_sizes, parse_buckets

    buckets = parse_buckets([[1, 32, 32, 8, 1], [4, 32, 32, 4, 1], [9, 32, 32, 4, 2]])
    native = [(9, 32, 32)] * 4000 + [(1, 32, 32)] * 100
    sizes = assign_sizes(native, buckets, seed=3)
    assert sizes == assign_sizes(native, buckets, seed=3)
    assert sizes != assign_sizes(native, buckets, seed=4)
    clips = sizes[:4000]
    share = {t: sum(s[0] == t for s in clips) / 4000 for t in (1, 4, 9)}
    assert abs(share[1] - 0.25) < 0.03 and abs(share[4] - 0.25) < 0.03 and abs(share[9] - 0.5) < 0.03
    assert all(s == (1, 32, 32) for s in sizes[4000:])  # images fit only one-frame buckets
    with pytest.raises(ValueError, match="no bucket takes 2 items"):
        assign_sizes([(9, 32, 32), (9, 48, 32)] + [(9, 48, 32)], parse_buckets([[9, 32, 32, 1]]))


def test_cut_clips_and_list_collate():
    import torch

    from patchflow.data.buckets import CutClips, collate_list

    data = [(torch.arange(2 * 5 * 3 * 3).float().view(2, 5, 3, 3), f"caption {i}") for i in range(3)]
    cut = CutClips(data, [1, 5, 3])
    assert [tuple(cut[i][0].shape) for i in range(3)] == [(2, 1, 3, 3), (2, 5, 3, 3), (2, 3, 3, 3)]
    assert torch.equal(cut[2][0], data[2][0][:, :3])
    xs, ys = collate_list([cut[0], cut[2]])
    assert [x.shape[1] for x in xs] == [1, 3] and ys == ["caption 0", "caption 2"]
