"""Latent caches: a data set's latents computed once, so a training step does no encoding.

A cache is a directory:
  cache.json                 format, version, the codec's identity, the data config, item count, fields, shards
  shard_00000.safetensors    per field a tensor of up to SHARD items: "latent" (n, c, t, h, w) float32, "label" (n,)

Items are kept by data set index, field by field, so other per-item tensors (the text embeddings of a captioned
data set) can join a cache as more fields. cache.json is written last, into a temporary folder renamed at the
end: a folder that has it is complete. A cache made with another codec, codec version or data config is refused.

A captions file (data.dataset = "captions") has no labels: its cache holds only "latent", and a text run takes
item i's caption from the file by index (`data.WithCaptions`), as it does for the built-in worlds. Its identity
holds a fingerprint of the file (its bytes, and the size and modification time of every image or clip it names),
so an edited file or a replaced image gives another cache; an image or video folder's identity likewise holds the
relative path, size and modification time of every file under it. A file that mixes images and clips has latents of
several sizes: a shard whose items differ in size holds per size "latent.K" (n_K, c, t_K, h, w) and "index.K"
(n_K,) int64, the items' positions in the shard ("latent_shape" in cache.json is then null, "latent_shapes" lists
the sizes). Caches of one size are written as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from patchflow.data.config import NUMBER_SHARE, DataConfig
from patchflow.paths import cache_root

FORMAT = "patchflow-latent-cache"
FORMAT_VERSION = 1
SHARD = 2048  # items per shard file
DATA_KEYS = ("dataset", "seed", "path", "image_size", "channels", "frames", "alpha_background", "short_clips")
CAPTIONED = ("captions",)  # data sets whose items carry a caption, not a label: their cache stores no "label"


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
    if cfg.start_grid:  # only when set, so the caches of runs without it keep their folder
        d["start_grid"] = cfg.start_grid
    if cfg.number_share != NUMBER_SHARE:  # likewise
        d["number_share"] = cfg.number_share
    if d["path"]:
        d["path"] = str(Path(d["path"]).expanduser().resolve())
    if cfg.dataset == "captions":
        d["content"] = captions_fingerprint(Path(cfg.path).expanduser())  # lines resolve as the data set's do
    elif cfg.dataset in ("folder", "video"):
        d["content"] = tree_fingerprint(Path(cfg.path).expanduser())
    return d


def _stat(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [None]
    return [st.st_size, st.st_mtime_ns]


def _files_under(root: Path) -> list[Path]:
    """Every file under a folder, recursively, in a fixed order (none for a missing folder)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def tree_fingerprint(root: str | Path) -> str:
    """A hash of the relative path, size and modification time of every file under an image or video folder:
    adding, removing or replacing a file changes it; nothing is decoded."""
    root = Path(root)
    files = _files_under(root)
    listing = [[str(f.relative_to(root)), *_stat(f)] for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


def captions_fingerprint(jsonl: str | Path) -> str:
    """A hash of a captions file's bytes and of the size and modification time of every file its lines name (all
    of a clip folder's files): editing a line or replacing an image or clip changes it; nothing is decoded. A
    missing file hashes as missing (the data set then says what is wrong with it)."""
    from patchflow.data.captions import BadEntry, parse_entry

    jsonl = Path(jsonl)
    h = hashlib.sha256()
    try:
        raw = jsonl.read_bytes()
    except OSError:
        return "missing"
    h.update(raw)
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            path = parse_entry(line, jsonl.parent)[0]
        except BadEntry:
            continue
        files = _files_under(path) if path.is_dir() else [path]  # a clip given as a folder of frames: all its files
        h.update(json.dumps([[str(f), *_stat(f)] for f in files]).encode())
    return h.hexdigest()[:32]


def default_cache_dir(data: DataConfig, codec_identity: dict) -> Path:
    """`<cache>/latents/<dataset>-<hash of data settings and codec>`: one folder per (data, codec) pair."""
    key = json.dumps({"data": data_identity(data), "codec": codec_identity}, sort_keys=True)
    return cache_root() / "latents" / f"{data.dataset}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def shapes_text(meta: dict) -> str:
    """A cache's latent size, "(2, 1, 16, 16)", or its sizes, "(3, 1, 4, 4) and (3, 3, 4, 4)", for messages."""
    if meta.get("latent_shape") is not None:
        return str(tuple(meta["latent_shape"]))
    return " and ".join(str(tuple(s)) for s in meta.get("latent_shapes", []))


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


def check_cache(directory: Path, data: DataConfig, codec_identity: dict, command: str = "",
                noun: str = "codec") -> dict:
    """The cache's metadata, or CacheError when it was made for another codec or other data (a stale cache).
    command: how to rebuild it, for the messages (a feature cache's is not a latent cache's); noun: what made it."""
    meta = read_meta(directory)
    rebuild = f"rebuild it with `{command or f'patchflow cache CONFIG --out {directory}'}` (or delete it)"
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"latent cache {directory} has format version {meta.get('format_version')}, this "
                         f"patchflow writes {FORMAT_VERSION}: {rebuild}")
    if meta.get("codec") != codec_identity:
        raise CacheError(f"latent cache {directory} is stale: it was made with {noun} "
                         f"{_describe(meta.get('codec', {}))} but this run's {noun} is {_describe(codec_identity)}; "
                         f"{rebuild}")
    want = data_identity(data)
    if meta.get("data") != want:
        diff = sorted(k for k in want if k != "content" and meta.get("data", {}).get(k) != want[k])
        if diff:
            raise CacheError(f"latent cache {directory} was made from other data (data.{', data.'.join(diff)} "
                             f"differ from this run's config); {rebuild}")
        what = (f"the captions file data.path = {data.path!r} or the images and clips it names" if
                data.dataset == "captions" else f"the files under data.path = {data.path!r}")
        raise CacheError(f"latent cache {directory} is stale: {what} changed since the cache was built; {rebuild}")
    return meta


@torch.no_grad()
def build_cache(directory: str | Path, data: DataConfig, codec, batch_size: int = 128, progress: bool = True,
                split: str = "train", dtype: torch.dtype = torch.float32, desc: str = "encoding latents") -> Path:
    """Encode every item of the data set (posterior modes) into `directory`, replacing what is there; stored in
    `dtype`. `codec` is anything with encode(x) and identity() and a buffer on its device (patchflow.data.
    feature_cache passes a vision encoder's feature extractor)."""
    from patchflow.data import build_dataset

    directory = Path(directory)
    identity = data_identity(data)  # before reading the data: a file edited meanwhile makes the cache stale
    dataset = build_dataset(data, split)
    labelled = data.dataset not in CAPTIONED
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(dataset), desc=desc, unit="item", dynamic_ncols=True)
    device = next(iter(codec.buffers())).device
    shards, shapes = [], set()
    try:
        for start in range(0, len(dataset), SHARD):
            stop = min(len(dataset), start + SHARD)
            latents, labels = [], []  # per item of the shard
            for i in range(start, stop, batch_size):
                items = [dataset[j] for j in range(i, min(stop, i + batch_size))]
                by_size = {}  # a captions file's images and clips differ in frames: encode each size apart
                for k, (x, _) in enumerate(items):
                    by_size.setdefault(tuple(x.shape), []).append(k)
                out = [None] * len(items)
                for ks in by_size.values():
                    z = codec.encode(torch.stack([items[k][0] for k in ks]).to(device)).to(dtype).cpu()
                    for k, zk in zip(ks, z):
                        out[k] = zk
                latents += out
                if labelled:
                    labels += [int(y) for _, y in items]
                if bar is not None:
                    bar.update(len(items))
            name = f"shard_{len(shards):05d}.safetensors"
            sizes = sorted({tuple(z.shape) for z in latents})
            shapes.update(sizes)
            if len(sizes) == 1:
                tensors = {"latent": torch.stack(latents).contiguous()}
            else:
                tensors = {}
                for k, size in enumerate(sizes):
                    index = [j for j, z in enumerate(latents) if tuple(z.shape) == size]
                    tensors[f"latent.{k}"] = torch.stack([latents[j] for j in index]).contiguous()
                    tensors[f"index.{k}"] = torch.as_tensor(index, dtype=torch.int64)
            if labelled:
                tensors["label"] = torch.as_tensor(labels, dtype=torch.int64)
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "items": len(latents)})
        shapes = [list(size) for size in sorted(shapes)]
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": codec.identity(),
                "data": identity, "split": split, "items": len(dataset),
                "latent_shape": shapes[0] if len(shapes) == 1 else None, "latent_shapes": shapes,
                "fields": ["latent", "label"] if labelled else ["latent"], "shards": shards}
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
    """Items (latent (c, t, h, w), label) read from a checked cache; everything is held in memory. A captions
    file's cache has no labels: its items are (latent, index), the caption coming from the file (WithCaptions).
    `latents` is one (n, c, t, h, w) tensor, or a list of per-item tensors when the sizes differ."""

    def __init__(self, directory: str | Path, data: DataConfig, codec_identity: dict, **check):
        self.directory = Path(directory)
        meta = check_cache(self.directory, data, codec_identity, **check)  # check: command, noun
        parts = []
        for shard in meta["shards"]:
            path = self.directory / shard["file"]
            try:
                parts.append(load_file(str(path)))
            except (OSError, ValueError, RuntimeError) as e:  # missing or cut shard
                raise CacheError(f"latent cache shard {path} is unreadable ({e}); rebuild the cache with "
                                 f"`patchflow cache CONFIG --out {self.directory}`") from None
        try:
            if all("latent" in p for p in parts) and len({tuple(p["latent"].shape[1:]) for p in parts}) <= 1:
                self.latents = torch.cat([p["latent"] for p in parts])
            else:  # items of several sizes: one tensor per item
                self.latents = [z for p in parts for z in _shard_items(p)]
            self.labels = torch.cat([p["label"] for p in parts]) if "label" in meta.get("fields", ["label"]) \
                else None
        except (KeyError, ValueError, RuntimeError) as e:
            raise CacheError(f"latent cache {self.directory} has shards that do not match its cache.json ({e}); "
                             f"rebuild it with `patchflow cache CONFIG --out {self.directory}`") from None
        n = len(self.latents)
        if n != meta["items"] or (self.labels is not None and len(self.labels) != n):
            raise CacheError(f"latent cache {self.directory} holds {n} items, its cache.json says "
                             f"{meta['items']}; rebuild it")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int):
        return self.latents[i], (i if self.labels is None else self.labels[i])


def _shard_items(part: dict) -> list[torch.Tensor]:
    """A shard's latents, item by item: "latent", or per size "latent.K" with the items' positions "index.K"."""
    if "latent" in part:
        return list(part["latent"])
    sizes = sorted(int(k.split(".")[1]) for k in part if k.startswith("latent."))
    out = {}
    for k in sizes:
        for j, z in zip(part[f"index.{k}"].tolist(), part[f"latent.{k}"]):
            out[j] = z
    if sorted(out) != list(range(len(out))):
        raise ValueError("the positions of its items are not 0..n-1")
    return [out[j] for j in range(len(out))]


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
