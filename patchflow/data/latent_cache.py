"""Latent caches: a data set's latents computed once, so a training step does no encoding.

A cache is a directory:
  cache.json                 format, version, the codec's identity, the data config, item count, fields, shards
  shard_00000.safetensors    per field a tensor of up to SHARD items: "latent" (n, c, t, h, w) float32, "label" (n,)

Items are kept by data set index, field by field, so other per-item tensors (the text embeddings of a captioned
data set) can join a cache as more fields. cache.json is written last, into a temporary folder renamed at the
end: a folder that has it is complete. A cache made with another codec, codec version or data config is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patchflow.config import DataConfig
from patchflow.paths import cache_root

FORMAT = "patchflow-latent-cache"
FORMAT_VERSION = 1
SHARD = 2048  # items per shard file
DATA_KEYS = ("dataset", "seed", "path", "image_size", "channels", "frames", "alpha_background", "short_clips")


class CacheError(ValueError):
    """A latent cache that does not belong to this run; the message says why and how to rebuild it."""


# a built-in world's items change when its generator changes: the version joins the identity, so caches of an
# older world are refused as stale instead of training on images the world no longer draws
WORLD_VERSIONS = {"digits": 1, "color-digits": 2, "moving-digits": 3}


def data_identity(cfg: DataConfig) -> dict:
    """The data settings that decide a data set's items (not the loader's worker count)."""
    d = {k: getattr(cfg, k) for k in DATA_KEYS}
    if cfg.dataset in WORLD_VERSIONS:
        d["world_version"] = WORLD_VERSIONS[cfg.dataset]
    if d["path"]:
        d["path"] = str(Path(d["path"]).expanduser().resolve())
    return d


def default_cache_dir(data: DataConfig, codec_identity: dict) -> Path:
    """`<cache>/latents/<dataset>-<hash of data settings and codec>`: one folder per (data, codec) pair."""
    key = json.dumps({"data": data_identity(data), "codec": codec_identity}, sort_keys=True)
    return cache_root() / "latents" / f"{data.dataset}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _describe(identity: dict) -> str:
    return f"{identity.get('kind')} v{identity.get('version')} #{identity.get('sha256')}"


def read_meta(directory: Path) -> dict:
    path = Path(directory) / "cache.json"
    if not path.is_file():
        raise CacheError(f"{directory} is not a latent cache ({path.name} missing); build it with "
                         f"`patchflow cache CONFIG --out {directory}`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is not readable JSON ({e}); delete {directory} and rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheError(f"{path} does not describe a patchflow latent cache")
    return meta


def check_cache(directory: Path, data: DataConfig, codec_identity: dict) -> dict:
    """The cache's metadata, or CacheError when it was made for another codec or other data (a stale cache)."""
    meta = read_meta(directory)
    rebuild = f"rebuild it with `patchflow cache CONFIG --out {directory}` (or delete it)"
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"latent cache {directory} has format version {meta.get('format_version')}, this "
                         f"patchflow writes {FORMAT_VERSION}: {rebuild}")
    if meta.get("codec") != codec_identity:
        raise CacheError(f"latent cache {directory} is stale: it was made with codec {_describe(meta.get('codec', {}))}"
                         f" but this run's codec is {_describe(codec_identity)}; {rebuild}")
    want = data_identity(data)
    if meta.get("data") != want:
        diff = sorted(k for k in want if meta.get("data", {}).get(k) != want[k])
        raise CacheError(f"latent cache {directory} was made from other data (data.{', data.'.join(diff)} "
                         f"differ from this run's config); {rebuild}")
    return meta


@torch.no_grad()
def build_cache(directory: str | Path, data: DataConfig, codec, batch_size: int = 128, progress: bool = True,
                split: str = "train") -> Path:
    """Encode every item of the data set (posterior modes) into `directory`, replacing what is there."""
    from patchflow.data import build_dataset

    directory = Path(directory)
    dataset = build_dataset(data, split)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(dataset), desc="encoding latents", unit="item", dynamic_ncols=True)
    device = next(iter(codec.buffers())).device
    shards, latent_shape = [], None
    try:
        for start in range(0, len(dataset), SHARD):
            latents, labels = [], []
            for i in range(start, min(len(dataset), start + SHARD), batch_size):
                items = [dataset[j] for j in range(i, min(len(dataset), start + SHARD, i + batch_size))]
                x = torch.stack([x for x, _ in items]).to(device)
                latents.append(codec.encode(x).float().cpu())
                labels.append(torch.as_tensor([int(y) for _, y in items], dtype=torch.int64))
                if bar is not None:
                    bar.update(len(items))
            name = f"shard_{len(shards):05d}.safetensors"
            tensors = {"latent": torch.cat(latents).contiguous(), "label": torch.cat(labels)}
            latent_shape = list(tensors["latent"].shape[1:])
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "items": len(tensors["label"])})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": codec.identity(),
                "data": data_identity(data), "split": split, "items": len(dataset), "latent_shape": latent_shape,
                "fields": ["latent", "label"], "shards": shards}
        (tmp / "cache.json").write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return directory


class LatentCacheDataset(torch.utils.data.Dataset):
    """Items (latent (c, t, h, w), label) read from a checked cache; everything is held in memory."""

    def __init__(self, directory: str | Path, data: DataConfig, codec_identity: dict):
        self.directory = Path(directory)
        meta = check_cache(self.directory, data, codec_identity)
        parts = []
        for shard in meta["shards"]:
            path = self.directory / shard["file"]
            try:
                parts.append(load_file(str(path)))
            except (OSError, ValueError, RuntimeError) as e:  # missing or cut shard
                raise CacheError(f"latent cache shard {path} is unreadable ({e}); rebuild the cache with "
                                 f"`patchflow cache CONFIG --out {self.directory}`") from None
        self.latents = torch.cat([p["latent"] for p in parts])
        self.labels = torch.cat([p["label"] for p in parts])
        if len(self.labels) != meta["items"]:
            raise CacheError(f"latent cache {self.directory} holds {len(self.labels)} items, its cache.json says "
                             f"{meta['items']}; rebuild it")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.latents[i], self.labels[i]


def cached_dataset(cfg, codec, progress: bool = True, build: bool = True) -> LatentCacheDataset | None:
    """The run's latent cache per codec.cache ("auto" builds the default one when missing and `build`; "off": None)."""
    setting = cfg.codec.cache.strip()
    if setting == "off":
        return None
    identity = codec.identity()
    if setting == "auto":
        directory = default_cache_dir(cfg.data, identity)
        if build and not (directory / "cache.json").is_file():
            build_cache(directory, cfg.data, codec, progress=progress)
    else:
        directory = Path(setting).expanduser()
        if not (directory / "cache.json").is_file():
            raise CacheError(f"codec.cache = {setting!r}: no latent cache there; build it with "
                             f"`patchflow cache CONFIG --out {directory}`, or set codec.cache = \"auto\"")
    return LatentCacheDataset(directory, cfg.data, identity)
