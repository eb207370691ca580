"""patchflow's own REPA teacher: a small convolutional encoder trained self-supervised on a data set's training split.

Two augmented views of each image (shifted by a few pixels, contrast and brightness jittered, colour channels
permuted, a square erased) are pulled together and apart from the other images' (SimCLR's NT-Xent loss, Chen et al.
2020); where the data set has labels (a built-in world's digit, a folder's class folders) every image of the same
label is pulled in too (supervised contrast, Khosla et al. 2020). So the features hold a glyph's shape wherever it
sits and whatever its colours. Its patch features are the stride-4 feature map plus a projection of its global average, so each patch
also carries what the whole image shows (as a ViT's patch tokens do). It shares no code, weights or training with
the classifiers that score samples (patchflow.evaluate).

`repa.encoder = "world"` trains one on the run's data the first time (a few CPU-minutes) into
`$PATCHFLOW_CACHE/encoders/<dataset>-<hash>`; `patchflow encoder CONFIG --out DIR` trains one on any data set."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchflow.paths import cache_root
from patchflow.weights import hash_files, load_into
from patchflow.vision.base import VisionEncoder, VisionError, fit_channels

WORLD_VERSION = 2  # 2: batch-normed head, instance + label contrast, glyph classes
META, WEIGHTS = "encoder.json", "encoder.safetensors"


@dataclass
class WorldRecipe:
    width: int = 16              # channels of the first stage (then 2x, 4x)
    dim: int = 128               # feature dimension
    steps: int = 200
    batch_size: int = 128        # images per step (two views each)
    lr: float = 2e-3
    temperature: float = 0.2
    max_shift: int = 3           # pixels a view is shifted by, at most
    items: int = 8192            # training images held in memory (a clip gives each of its frames)
    seed: int = 0


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation),
                         nn.GroupNorm(8, cout), nn.SiLU())


class WorldNet(nn.Module):
    """(N, C, H, W) -> feature map (N, dim, H/4, W/4); the contrastive head works on its global average."""

    def __init__(self, in_channels: int, width: int = 32, dim: int = 128):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(in_channels, w), _conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w),
                                  _conv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w, dilation=2),
                                  nn.Conv2d(4 * w, dim, 3, padding=2, dilation=2))
        self.context = nn.Linear(dim, dim)   # the global view each patch feature also carries
        # batch norm in the head (SimCLR's): at init the pooled features of near-identical digit images point the same
        # way, and without it the contrastive gradient vanishes (the loss sat at log(2N - 1))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)
        return f + self.context(f.mean((2, 3)))[:, :, None, None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x).mean((2, 3)))


def augment(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """A random view of each image (N, C, H, W) in [-1, 1]: shifted (the background value fills in), contrast
    and brightness jittered, channels permuted, one square erased."""
    n, c, h, w = x.shape
    s = max_shift
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(x - background, (s, s, s, s)) + background
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * s)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    scale = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.2, generator=g)
    offset = torch.empty(n, 1, 1, 1).uniform_(-0.2, 0.2, generator=g)
    out = (out * scale + offset).clamp(-1, 1)
    if c > 1:
        perm = torch.stack([torch.randperm(c, generator=g) for _ in range(n)])
        out = out.gather(1, perm[:, :, None, None].expand(n, c, h, w))
    size = max(h // 4, 1)
    y0, x0 = torch.randint(0, h - size + 1, (n,), generator=g), torch.randint(0, w - size + 1, (n,), generator=g)
    yy, xx = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    hole = ((yy >= y0[:, None, None]) & (yy < y0[:, None, None] + size) &
            (xx >= x0[:, None, None]) & (xx < x0[:, None, None] + size))[:, None]
    return torch.where(hole, background, out)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Paired view embeddings a, b: (N, D). Without labels SimCLR's NT-Xent (each view must pick its partner among
    the 2N - 1 others); with labels (N,) supervised contrast (Khosla et al. 2020: every view of the same label is
    a positive)."""
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    log_prob = logits.log_softmax(dim=1)
    ids = torch.cat([torch.arange(n)] * 2) if labels is None else torch.cat([labels, labels])
    positive = (ids[:, None] == ids[None, :]) & ~torch.eye(2 * n, dtype=torch.bool)
    return -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1)).mean()


def training_images(data_cfg, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to `limit` images (N, C, H, W) of the data set's training split (every frame of its clips) and their
    labels (N,) (a built-in world's glyph class: digit, or 10 + a two-digit number), None when the data set has one
    label only (a folder without class folders)."""
    from patchflow.data import build_dataset

    dataset = build_dataset(data_cfg, "train")
    if len(dataset) == 0:
        raise VisionError(f"data set {data_cfg.dataset!r} has no training items to train a world encoder on")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    images, labels, count = [], [], 0
    for i in order:
        x, y = dataset[i]  # (C, T, H, W), int
        y = dataset.glyph_class(i) if hasattr(dataset, "glyph_class") else y
        images.append(x.permute(1, 0, 2, 3))
        labels += [int(y)] * x.shape[1]
        count += x.shape[1]
        if count >= limit:
            break
    labels = torch.tensor(labels[:limit])
    return torch.cat(images)[:limit].float(), (labels if len(labels.unique()) > 1 else None)


def train_world_encoder(data_cfg, out: str | Path, recipe: WorldRecipe = WorldRecipe(),
                        progress: bool = True) -> Path:
    """Train a world encoder on `data_cfg`'s training split into `out` (encoder.json, encoder.safetensors),
    written whole or not at all."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    t0 = time.perf_counter()
    images, labels = training_images(data_cfg, recipe.items, recipe.seed)
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    net = WorldNet(images.shape[1], recipe.width, recipe.dim)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    losses = []
    for step in range(recipe.steps):
        lr = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps)) * min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(0, len(images), (recipe.batch_size,), generator=g)
        views = augment(images[pick].repeat(2, 1, 1, 1), recipe.max_shift, g)
        a, b = net.embed(views).chunk(2)
        loss = contrastive_loss(a, b, recipe.temperature)  # each view finds its partner: no collapse to labels
        if labels is not None:
            loss = loss + contrastive_loss(a, b, recipe.temperature, labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress and (step + 1) % 25 == 0:
            print(f"\rworld encoder: step {step + 1}/{recipe.steps} loss {sum(losses[-25:]) / 25:.3f}", end="",
                  flush=True)
    if progress:
        print()
    from patchflow.data.latent_cache import data_identity

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
    meta = {"kind": "patchflow-world-encoder", "version": WORLD_VERSION, "in_channels": int(images.shape[1]),
            "image_size": int(images.shape[-1]), "recipe": asdict(recipe), "data": data_identity(data_cfg),
            "first_loss": sum(losses[:10]) / min(10, len(losses)),
            "final_loss": sum(losses[-25:]) / min(25, len(losses)), "seconds": round(time.perf_counter() - t0, 1)}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def default_world_dir(data_cfg, recipe: WorldRecipe = WorldRecipe()) -> Path:
    from patchflow.data.latent_cache import data_identity

    key = json.dumps({"data": data_identity(data_cfg), "recipe": asdict(recipe), "version": WORLD_VERSION},
                     sort_keys=True, default=str)
    return cache_root() / "encoders" / f"{data_cfg.dataset}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def is_world_dir(path: Path) -> bool:
    return (path / META).is_file()


class WorldEncoder(VisionEncoder):
    """A trained world encoder directory as a frozen VisionEncoder: features (N, H/4, W/4, dim)."""

    def __init__(self, path: str | Path):
        super().__init__()
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        try:
            meta = json.loads((path / META).read_text())
            names = {f.name for f in fields(WorldRecipe)}
            recipe = WorldRecipe(**{k: v for k, v in meta["recipe"].items() if k in names})
            in_channels = int(meta["in_channels"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VisionError(f"{path / META} is not a world encoder's description ({e}); train it again with "
                              f"`patchflow encoder CONFIG --out {path}`") from e
        if not (path / WEIGHTS).is_file():
            raise VisionError(f"{path} is incomplete: {WEIGHTS} is missing; train it again with "
                              f"`patchflow encoder CONFIG --out {path}`")
        self.net = WorldNet(in_channels, recipe.width, recipe.dim)
        self.net.head = nn.Identity()  # the contrastive head only trains; features come before it (any version's)
        tensors = {k: v for k, v in load_file(str(path / WEIGHTS)).items() if not k.startswith("head.")}
        load_into(self.net, tensors, source=str(path / WEIGHTS))
        self.net.eval().requires_grad_(False)
        self.channels, self.dim, self.source = in_channels, recipe.dim, str(path)
        self.name = f"world encoder ({path.name})"
        self._identity = {"kind": "patchflow-world-encoder", "version": int(meta.get("version", 0)),
                          "sha256": hash_files([path / WEIGHTS])[:16]}

    def identity(self) -> dict:
        return dict(self._identity)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) in [-1, 1] -> (N, H/4, W/4, dim)."""
        x = fit_channels(x.float(), self.channels, self.source)
        return self.net(x).permute(0, 2, 3, 1)
