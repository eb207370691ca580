"""REPA's encoder features of a data set, computed once before training: a latent cache whose "codec" is a frozen
vision encoder, so a step runs no encoder.

Each item's features are its frames' patch features, average-pooled to the model's token grid (one row and column
per `pixels_per_token` pixels: the codec's downsampling times the patch size) and, for clips, to the frames the model
sees (a time-compressing codec's latent frames): (T_x, H', W', D) float16. The cache lives beside the latent caches,
`$PATCHFLOW_CACHE/latents/<dataset>-<hash>`, the hash of the data settings and of the extractor's identity (the
encoder's weights and preprocessing, the grid); a folder made with another encoder is refused with the command that
rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchflow.data.latent_cache import CacheError, LatentCacheDataset, build_cache, default_cache_dir

FEATURES_VERSION = 1


class FeatureExtractor(nn.Module):
    """items (N, C, H, W) or (N, C, T, H, W) in [-1, 1] -> (N, T_x, H / pixels_per_token, W / pixels_per_token, D):
    `encoder.features` of every frame (N*T, h, w, D), pooled to the token grid; T_x = latent_frames(T) (1 for
    images)."""

    def __init__(self, encoder, pixels_per_token: int, latent_frames: Callable[[int], int] = lambda t: t):
        super().__init__()
        self.encoder, self.pixels_per_token, self.latent_frames = encoder, int(pixels_per_token), latent_frames
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # where build_cache sends the items

    def identity(self) -> dict:
        encoder = self.encoder.identity()
        key = {"encoder": encoder, "pixels_per_token": self.pixels_per_token, "version": FEATURES_VERSION}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return {"kind": f"features:{self.encoder.name}", "version": FEATURES_VERSION, "sha256": digest,
                "pixels_per_token": self.pixels_per_token, "encoder": encoder}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        clip = x.ndim == 5
        if not clip:
            x = x[:, :, None]
        n, c, t, h, w = x.shape
        p = self.pixels_per_token
        if h % p or w % p:
            raise CacheError(f"items of {h}x{w} pixels do not split into tokens of {p}x{p} pixels")
        frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w).to(self.anchor.device)
        f = self.encoder.features(frames)  # (N*T, h_e, w_e, D)
        f = f.reshape(n, t, *f.shape[1:]).permute(0, 4, 1, 2, 3).float()  # (N, D, T, h_e, w_e)
        f = F.adaptive_avg_pool3d(f, (self.latent_frames(t) if clip else 1, h // p, w // p))
        return f.permute(0, 2, 3, 4, 1).contiguous()


def feature_dataset(cfg, encoder, pixels_per_token: int, latent_frames: Callable[[int], int] = lambda t: t,
                    progress: bool = True, build: bool = True, into: Path | None = None) -> LatentCacheDataset:
    """The run's features per repa.cache: "auto" builds the default cache when it is missing (and `build`), a
    directory must hold one of this data and encoder. `into` (`patchflow cache --features DIR`): that folder,
    built when it is missing or stale. Items: (features (T_x, H', W', D), label or index)."""
    extractor = FeatureExtractor(encoder, pixels_per_token, latent_frames)
    identity = extractor.identity()
    setting = cfg.repa.cache.strip()
    directory = Path(into) if into else default_cache_dir(cfg.data, identity) if setting == "auto" else \
        Path(setting).expanduser()
    check = {"noun": "encoder", "command": f"patchflow cache CONFIG --features {directory}"}

    def build_here():
        build_cache(directory, cfg.data, extractor, progress=progress, dtype=torch.float16,
                    desc=f"{encoder.name} features")

    if into is not None:  # (re)built there unless it is up to date
        try:
            return LatentCacheDataset(directory, cfg.data, identity, **check)
        except CacheError as e:
            if (directory / "cache.json").is_file():
                print(f"rebuilding: {e}")
        build_here()
    elif not (directory / "cache.json").is_file():
        if setting != "auto":
            raise CacheError(f"repa.cache = {setting!r}: no feature cache there; build it with `patchflow cache "
                             f"CONFIG --features {directory}`, or set repa.cache = \"auto\"")
        if build:
            build_here()
    return LatentCacheDataset(directory, cfg.data, identity, **check)


class WithFeatures(torch.utils.data.Dataset):
    """Items (x, y, features) of `dataset`'s (x, y), item i's features from the index-aligned `features`, cut to
    x's frames when a clip was cut to a bucket's (x (C, T, H, W): the first T of them)."""

    def __init__(self, dataset, features):
        if len(dataset) != len(features):
            raise CacheError(f"the feature cache holds {len(features)} items, the data set {len(dataset)}: it is "
                             f"not of this data; rebuild it with `patchflow cache CONFIG --features DIR`")
        self.dataset, self.features = dataset, features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        f = self.features[i][0]
        return x, y, (f[:x.shape[1]] if x.ndim == 4 else f)
