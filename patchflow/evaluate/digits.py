"""Evaluation of samples of the built-in `digits` world.

A small CNN digit classifier, trained by patchflow itself on the `digits` train split (deterministic,
a few seconds on CPU) and cached as safetensors, gives two figures for generated digits:

* **accuracy** - the fraction of samples the classifier assigns to the label they were generated for
  (class-conditional fidelity);
* **fd** - the Frechet distance, in the classifier's penultimate feature space, between the samples and
  the 500 held-out validation digits (an "FID" for digits). FD is biased upwards for small sample
  counts, so **fd_real** gives the floor a perfect generator would reach: the FD between an equally
  sized random subset of real *train* digits and the same validation digits.

Public API: :func:`get_classifier`, :class:`DigitClassifier`, :func:`to_classifier_input`,
:func:`frechet_distance`, :func:`evaluate_samples`.
"""
from __future__ import annotations

import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from patchflow.data.digits import NUM_CLASSES, SIZE, load_digits

__all__ = [
    "DigitClassifier",
    "get_classifier",
    "to_classifier_input",
    "frechet_distance",
    "evaluate_samples",
    "CACHE_FILENAME",
    "CLASSIFIER_VERSION",
]

CACHE_FILENAME = "digit_classifier.safetensors"
# Bump whenever the architecture, the training recipe or the input convention changes: a cached file
# with another version is ignored and retrained.
CLASSIFIER_VERSION = "digitcnn-v1:c16-c32-c64-f128:shift2:e10:seed0"
FEATURE_DIM = 128

_TRAIN_SEED = 0
_EPOCHS = 10
_BATCH = 64
_LR = 3e-3
_MAX_SHIFT = 2
_LUMA = np.array([0.299, 0.587, 0.114])


class DigitClassifier(nn.Module):
    """Three 3x3 conv blocks (16, 32, 64 channels, each followed by 2x2 max-pooling), a 128-d feature
    layer and a linear head. Input: float (B, 1, 32, 32) in [-1, 1] (see :func:`to_classifier_input`)."""

    feature_dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.val_accuracy: float = float("nan")  # set by get_classifier

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, SIZE, SIZE):
            raise ValueError(f"DigitClassifier expects x of shape (B, 1, {SIZE}, {SIZE}), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) features, (B, 128)."""
        self._check(x)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16x16
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8x8
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 4x4
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B, 10)."""
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# input conversion


def to_classifier_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float tensor (N, 1, 32, 32) in [-1, 1].

    Accepts (N, H, W), (N, H, W, 1) or (N, H, W, 3) (RGB is converted to grey with ITU-R 601 luma
    weights), with H = W = 32, or 28 (MNIST size; zero-padded by 2 px on each side like the dataset).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 array with values 0..255, got dtype {images.dtype}; convert e.g. "
            "[-1, 1] floats with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
        )
    shape = images.shape
    if images.ndim == 4:
        if shape[-1] == 1:
            images = images[..., 0]
        elif shape[-1] == 3:
            images = np.rint(images.astype(np.float64) @ _LUMA).clip(0, 255).astype(np.uint8)
        else:
            raise ValueError(
                f"4-d images must be (N, H, W, 1) or (N, H, W, 3) (channels last), got shape {shape}"
            )
    elif images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), (N, H, W, 1) or (N, H, W, 3), got shape {shape}")
    h, w = images.shape[1:]
    if (h, w) == (28, 28):
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    elif (h, w) != (SIZE, SIZE):
        raise ValueError(f"images must be {SIZE}x{SIZE} (or 28x28, which is padded), got {h}x{w} (shape {shape})")
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)[:, None]


# ----------------------------------------------------------------------------------------------
# training and caching


def _shifted(padded: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crops of `padded` (N, S+2m, S+2m): every image shifted independently by up to m px."""
    n = padded.shape[0]
    m = _MAX_SHIFT
    dy = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=gen)
    ar = torch.arange(SIZE)
    rows = (dy[:, None] + ar)[:, :, None]  # (n, S, 1)
    cols = (dx[:, None] + ar)[:, None, :]  # (n, 1, S)
    return padded[torch.arange(n)[:, None, None], rows, cols]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).argmax(1)


def _val_accuracy(model: DigitClassifier) -> float:
    images, labels = load_digits("val")
    pred = _predict(model.eval(), to_classifier_input(images))
    return float((pred == torch.from_numpy(labels)).float().mean())


def _train_classifier(verbose: bool = True) -> DigitClassifier:
    """Train a fresh classifier on the `digits` train split, deterministically (fixed seed)."""
    t0 = time.perf_counter()
    images, labels = load_digits("train")
    x = to_classifier_input(images)[:, 0]  # (N, 32, 32) in [-1, 1]
    y = torch.from_numpy(labels)
    padded = F.pad(x, (_MAX_SHIFT,) * 4, value=-1.0)  # background is -1
    gen = torch.Generator().manual_seed(_TRAIN_SEED)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(_TRAIN_SEED)
        model = DigitClassifier()
    n = len(y)
    steps = _EPOCHS * ((n + _BATCH - 1) // _BATCH)
    opt = torch.optim.Adam(model.parameters(), lr=_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_LR, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(_EPOCHS):
        xs = _shifted(padded, gen)[:, None]
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, _BATCH):
            idx = perm[i : i + _BATCH]
            loss = F.cross_entropy(model(xs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if verbose:
            print(f"[patchflow] digit classifier epoch {epoch + 1}/{_EPOCHS}: train loss {total / n:.4f}", flush=True)
    model.eval()
    model.val_accuracy = _val_accuracy(model)
    if verbose:
        print(
            f"[patchflow] digit classifier trained in {time.perf_counter() - t0:.1f}s: "
            f"val accuracy {model.val_accuracy:.4f}",
            flush=True,
        )
    return model


def _cache_path(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        from patchflow.paths import cache_root

        cache_dir = cache_root()
    return Path(cache_dir).expanduser() / CACHE_FILENAME


def _load_cached(path: Path) -> DigitClassifier:
    """Load `path`; raises (ValueError / RuntimeError / OSError / ...) if it is unusable."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("version") != CLASSIFIER_VERSION:
        raise ValueError(f"version {meta.get('version')!r} != {CLASSIFIER_VERSION!r}")
    state = load_file(str(path))
    model = DigitClassifier()
    model.load_state_dict(state, strict=True)
    model.val_accuracy = float(meta["val_accuracy"])
    return model.eval()


def _save(model: DigitClassifier, path: Path) -> None:
    """Atomic write: a temp file in the same directory, then os.replace."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"version": CLASSIFIER_VERSION, "val_accuracy": repr(model.val_accuracy)}
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def get_classifier(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> DigitClassifier:
    """The digit classifier, in eval mode, with its validation accuracy in ``.val_accuracy``.

    Loaded from ``<cache_dir>/digit_classifier.safetensors`` (default cache dir: ``$PATCHFLOW_CACHE``,
    else ``~/.cache/patchflow``); trained (deterministically, seconds on CPU) and cached when the file is
    missing, corrupt or of another classifier version.
    """
    path = _cache_path(cache_dir)
    if path.exists():
        try:
            model = _load_cached(path)
        except Exception as e:  # corrupt / truncated / other version / wrong tensors
            warnings.warn(f"digit classifier cache {path} is unusable ({type(e).__name__}: {e}); retraining",
                          RuntimeWarning, stacklevel=2)
        else:
            if verbose:
                print(f"[patchflow] digit classifier loaded from {path} (val accuracy {model.val_accuracy:.4f})",
                      flush=True)
            return model
    elif verbose:
        print(f"[patchflow] no digit classifier at {path}; training one", flush=True)
    model = _train_classifier(verbose=verbose)
    try:
        _save(model, path)
    except OSError as e:
        warnings.warn(f"could not cache the digit classifier at {path}: {e}", RuntimeWarning, stacklevel=2)
    return model


# ----------------------------------------------------------------------------------------------
# metrics


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples), float64:

    ||mu_a - mu_b||^2 + tr(Sa) + tr(Sb) - 2 tr((Sa^1/2 Sb Sa^1/2)^1/2),

    computed with symmetric eigendecompositions (negative round-off eigenvalues clipped to 0), so it is
    stable for singular covariances (fewer samples than feature dims). Covariances use ddof=1.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    for name, f in (("feats_a", a), ("feats_b", b)):
        if f.ndim != 2:
            raise ValueError(f"{name} must be 2-d (N, D), got shape {f.shape}")
        if f.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {f.shape[0]}")
        if not np.isfinite(f).all():
            raise ValueError(f"{name} contains non-finite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa = np.atleast_2d(np.cov(a, rowvar=False))
    sb = np.atleast_2d(np.cov(b, rowvar=False))
    ra = _psd_sqrt(sa)
    inner = ra @ sb @ ra
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_cross = np.sqrt(np.clip(w, 0.0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * tr_cross)
    return max(fd, 0.0)


@torch.no_grad()
def _features_and_preds(model: DigitClassifier, x: torch.Tensor, batch: int = 500):
    feats, preds = [], []
    for i in range(0, len(x), batch):
        f = model.features(x[i : i + batch])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def _check_labels(labels, n: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d (N,), got shape {labels.shape}")
    if len(labels) != n:
        raise ValueError(f"labels has length {len(labels)} but there are {n} images")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers 0..{NUM_CLASSES - 1}, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"labels must be in 0..{NUM_CLASSES - 1}, got values in {int(labels.min())}..{int(labels.max())}"
        )
    return labels.astype(np.int64)


def evaluate_samples(images: np.ndarray, labels: np.ndarray, cache_dir=None, seed: int = 0) -> dict:
    """Score class-conditional samples of the `digits` world.

    ``images``: uint8 (N, 32, 32) (see :func:`to_classifier_input` for the accepted layouts);
    ``labels``: int (N,) in 0..9, the class each sample was generated for; N >= 2.

    Returns a dict:
      n                        number of samples
      accuracy                 fraction of samples classified as their label
      per_class_accuracy       list of 10 (NaN for a class with no samples)
      fd                       Frechet distance (classifier features) samples <-> the 500 val digits
      fd_real                  FD of N random real train digits with the same label counts as
                               ``labels`` (seeded by ``seed``; at most the ~450 train digits of a class
                               each) <-> the same val digits: the floor a perfect generator would reach
                               at this N. FD estimates are noisy (at N=500, fd_real varies by ~10%
                               across seeds), so treat fd within ~1.3x fd_real as at the floor.
      classifier_val_accuracy  accuracy of the classifier on the val split
    """
    x = to_classifier_input(images)
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 samples to compute a Frechet distance, got {n}")
    y = _check_labels(labels, n)
    model = get_classifier(cache_dir, verbose=False)

    feats, pred = _features_and_preds(model, x)
    correct = pred == y
    per_class = [float(correct[y == c].mean()) if (y == c).any() else float("nan") for c in range(NUM_CLASSES)]

    val_images, _ = load_digits("val")
    val_feats, _ = _features_and_preds(model, to_classifier_input(val_images))
    # The floor: real train digits with the same label counts as the samples (what a perfect
    # class-conditional generator would produce). Matching the class mix matters: an unstratified
    # subset's class proportions wobble, which shifts the feature mean and makes the floor ~4x noisier.
    train_images, train_labels = load_digits("train")
    rng = np.random.default_rng(seed)
    idx = []
    for c in range(NUM_CLASSES):
        pool = np.flatnonzero(train_labels == c)
        k = min(int((y == c).sum()), len(pool))  # capped at the ~450 train digits of a class
        idx.append(rng.choice(pool, size=k, replace=False))
    idx = np.sort(np.concatenate(idx))
    real_feats, _ = _features_and_preds(model, to_classifier_input(train_images[idx]))

    return {
        "n": int(n),
        "accuracy": float(correct.mean()),
        "per_class_accuracy": per_class,
        "fd": frechet_distance(feats, val_feats),
        "fd_real": frechet_distance(real_feats, val_feats),
        "classifier_val_accuracy": float(model.val_accuracy),
    }
