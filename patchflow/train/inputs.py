"""The data a run trains on, prepared before its first step: the class folders checked, latents from the codec's
cache (the main process builds a missing "auto" cache, the others wait for it) or pixels that each step encodes, a
text run's caption embeddings cached, each item's training size (buckets, packing) and the resumable batch order.

Text runs differ (captions with their items, an embedding cache; no class folders): each function here that cares
asks cfg.kind.prompts.
"""
from __future__ import annotations

import dataclasses
import signal
import warnings
from pathlib import Path

import torch

from patchflow.config import ConfigError, RunConfig
from patchflow.data import ResumableBatchSampler, WithCaptions, build_dataset, images_config, mix_images, pixel_shape
from patchflow.train import distributed


def check_classes(cfg: RunConfig) -> list[str]:
    """The class folder names of a class run on the user's folder (label = position; [] otherwise), checked:
    model.num_classes must cover them (a label >= num_classes would be taken for the null class of guidance, or
    fail in the embedding)."""
    d = cfg.data
    if cfg.kind.prompts or d.dataset not in ("folder", "video") or not Path(d.path).expanduser().is_dir():
        return []  # a missing folder is reported, with its key, when the data set is built
    from patchflow.data.folder import find_images
    from patchflow.data.video import find_clips

    with warnings.catch_warnings():  # the data set warns about loose files itself, once
        warnings.simplefilter("ignore")
        classes, _ = (find_images if d.dataset == "folder" else find_clips)(Path(d.path).expanduser())
    if len(classes) > cfg.model.num_classes:
        raise ConfigError(f"data.path = {d.path!r} has {len(classes)} class folders ({', '.join(classes[:5])}"
                          f"{', ...' if len(classes) > 5 else ''}) but model.num_classes = {cfg.model.num_classes}; "
                          f"set model.num_classes = {len(classes)}")
    return classes


def latent_data(cfg: RunConfig, codec, dist, device: torch.device, progress: bool = True):
    """(data set, encode) of a latent run: cached latents when codec.cache allows, else pixels that each step
    encodes (encode = True). Moves the codec to `device` once the caches are built."""
    from patchflow.data.latent_cache import cached_dataset

    main, text = dist.main, cfg.kind.prompts
    if main:
        dataset = cached_dataset(cfg, codec, progress=progress, build=True)
    distributed.barrier(dist)
    if not main:
        dataset = cached_dataset(cfg, codec, progress=False, build=False)
    codec.to(device)
    if dataset is not None and text:  # latents from the cache, captions from the data set (no images read)
        dataset = WithCaptions(dataset, build_dataset(cfg.data, "train", text=True))
    encode = dataset is None
    if encode:
        dataset = build_dataset(cfg.data, "train", text=text)
    if cfg.data.mix_images:  # color-digits images as one-frame clips, through the same codec and cache
        images_cfg = dataclasses.replace(cfg, data=images_config(cfg.data))
        images = cached_dataset(images_cfg, codec, progress=progress and main, build=main)
        distributed.barrier(dist)
        if images is None or encode:
            images = build_dataset(images_cfg.data, "train", text=True)
        else:
            images = WithCaptions(images, build_dataset(images_cfg.data, "train", text=True))
        dataset = mix_images(dataset, images, cfg.data.mix_images)
    return dataset, encode


def pixel_data(cfg: RunConfig):
    """The data set of a run on pixels (codec.source = "identity"), with data.mix_images' images."""
    dataset = build_dataset(cfg.data, "train", text=cfg.kind.prompts)
    if cfg.data.mix_images:
        dataset = mix_images(dataset, build_dataset(images_config(cfg.data), "train", text=True), cfg.data.mix_images)
    return dataset


def training_sizes(cfg: RunConfig, dataset, codec, encode: bool, world: int):
    """(sizes, data set): each item's training size (frames, height, width) in pixels when the run trains on
    several sizes (data.buckets, or packing of mixed images and clips), the data cut to it; sizes None for one
    fixed size. A captions file's items have their own frames (images 1, clips data.frames): without buckets or
    packing they must all have the model's (data.check_dense_frames)."""
    from patchflow.data import check_dense_frames, item_frames
    from patchflow.data.buckets import CutClips, assign_sizes, check_buckets, parse_buckets

    d = cfg.data
    _, frames, size = pixel_shape(d)
    latent = (lambda s: s) if codec is None else \
        (lambda s: tuple(codec.latent_shape((1, codec.in_channels or 3, *s))[2:]))
    if not d.buckets and not cfg.train.pack_tokens:
        try:
            check_dense_frames(dataset, getattr(cfg.model, "frames", 1), lambda t: latent((t, size, size))[0])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return None, dataset
    counts = item_frames(dataset)  # a captions file: each item's own frames
    native = [(t, size, size) for t in counts] if counts is not None else \
        [(frames, size, size)] * (len(dataset) - d.mix_images) + [(1, size, size)] * d.mix_images
    sizes = native
    if d.buckets:
        buckets = parse_buckets(d.buckets)
        try:
            sizes = assign_sizes(native, buckets, seed=d.seed)
            check_buckets(buckets, sizes, patch=(cfg.model.temporal_patch, cfg.model.patch_size,
                                                 cfg.model.patch_size), latent=latent,
                          codec_ok=None if codec is None else (lambda s: codec.frames_ok(s[0])),
                          world=1 if cfg.train.pack_tokens else world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # the data's frames: latent frames from a latent cache, pixel frames when each step encodes (codec.cache off)
    frames_of = (lambda s: s[0]) if encode else (lambda s: latent(s)[0])
    cut = [frames_of(s) for s in sizes]
    if any(f != frames_of(n) for f, n in zip(cut, native)):
        dataset = CutClips(dataset, cut)
    return sizes, dataset


def item_tokens(cfg: RunConfig, codec, size) -> int:
    """Image tokens of an item of pixel size (T, H, W)."""
    m = cfg.model
    t, h, w = size if codec is None else codec.latent_shape((1, codec.in_channels or 3, *size))[2:]
    return (t // getattr(m, "temporal_patch", 1)) * (h // m.patch_size) * (w // m.patch_size)


def batch_sampler(cfg: RunConfig, dataset, sizes, codec, step: int, shard: tuple[int, int]):
    """Dense batches of one size (ResumableBatchSampler), one bucket's size per batch (BucketBatchSampler), or
    packs of any sizes under train.pack_tokens image tokens (PackedBatchSampler), from optimizer step `step` on."""
    from patchflow.data.buckets import BucketBatchSampler, PackedBatchSampler, parse_buckets

    t = cfg.train
    start = step * t.grad_accum
    if sizes is None:
        return ResumableBatchSampler(len(dataset), t.batch_size, seed=t.seed, start=start, shard=shard)
    if t.pack_tokens:
        tokens = [item_tokens(cfg, codec, s) for s in sizes]
        return PackedBatchSampler(tokens, t.pack_tokens, seed=t.seed, start=start, shard=shard)
    return BucketBatchSampler(sizes, parse_buckets(cfg.data.buckets), seed=t.seed, start=start, shard=shard)


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers leave SIGTERM to the trainer (SLURM signals every process of a job), which stops them itself
    after its checkpoint; a worker killed by it would make the DataLoader raise mid-step."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(cfg: RunConfig, dataset, sampler, device: torch.device, rank: int) -> torch.utils.data.DataLoader:
    """The DataLoader over `sampler`'s batches; packs of differently sized items come as lists."""
    from patchflow.data.buckets import collate_list

    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                       collate_fn=collate_list if cfg.train.pack_tokens > 0 else None,
                                       pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigterm,
                                       # its own generator (per process): iter() must not draw from the
                                       # global RNG, and workers get per-process seeds
                                       generator=torch.Generator().manual_seed(cfg.train.seed + rank))


def text_cache(cfg: RunConfig, encoder, dataset, dist, progress: bool = True):
    """A text run's frozen encoder, behind its embedding cache unless text.cache = "off": the main process
    encodes every training caption once before the first step, the others wait and read the cache. None for
    runs without prompts."""
    if not cfg.kind.prompts:
        return None
    from patchflow.data import captions_of
    from patchflow.paths import cache_root
    from patchflow.text import TextEmbeddingCache

    setting = cfg.text.cache.strip()
    if setting == "off":
        return encoder
    directory = cache_root() / "text" if setting == "auto" else Path(setting).expanduser()
    if dist.main:
        cache = TextEmbeddingCache(directory, encoder)
        cache.precompute(captions_of(dataset), progress=progress)
    distributed.barrier(dist)
    return cache if dist.main else TextEmbeddingCache(directory, encoder)


def feature_grid(cfg: RunConfig, codec) -> tuple[int, object]:
    """(pixels per token side, pixel frames -> the model input's frames) of a run on pixels (codec None) or latents."""
    channels, _, size = pixel_shape(cfg.data)
    if codec is None:
        return cfg.model.patch_size, (lambda t: t)
    factor = size // codec.latent_shape((1, channels, 1, size, size))[-1]
    return factor * cfg.model.patch_size, codec.latent_frames


def with_features(cfg: RunConfig, dataset, encoder, codec, dist, device: torch.device, progress: bool = True):
    """REPA: the data set's items with their encoder features (patchflow.data.feature_cache), computed once into
    the cache by the main process on `device`, before the first step; the others wait and read it."""
    from patchflow.data.feature_cache import WithFeatures, feature_dataset

    per_token, latent_frames = feature_grid(cfg, codec)
    encoder.to(device)
    if dist.main:
        features = feature_dataset(cfg, encoder, per_token, latent_frames, progress=progress, build=True)
    distributed.barrier(dist)
    if not dist.main:
        features = feature_dataset(cfg, encoder, per_token, latent_frames, progress=False, build=False)
    encoder.to("cpu")  # a step reads the cache, never the encoder
    return WithFeatures(dataset, features)
