"""Data sets and the resumable batch order."""
from __future__ import annotations

import dataclasses

import torch

from patchflow.data.config import NUMBER_SHARE, DataConfig


def pixel_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """(channels, frames, size) of the items `build_dataset(cfg)` gives: x is (channels, frames, size, size).

    "captions" says 1 frame (images); a captions file's clip lines give data.frames frames: `item_frames` lists
    the frames of each of its items."""
    if cfg.dataset == "digits":
        return 1, 1, 32
    if cfg.dataset == "color-digits":
        return 3, 1, 32
    if cfg.dataset == "moving-digits":
        return 3, cfg.frames, 32
    return cfg.channels, cfg.frames if cfg.dataset == "video" else 1, cfg.image_size


def build_dataset(cfg: DataConfig, split: str = "train", text: bool = False) -> torch.utils.data.Dataset:
    """Items are (x: (C, T, H, W) in [-1, 1], label int), or with `text` (x, caption str); T = 1 for images,
    data.frames for video. A built-in world's captions mix in paraphrases when data.paraphrases. "captions" gives
    (x, caption) either way: T = 1 for its image lines, data.frames for its clip lines (data.short_clips applies).

    "folder" and "video" have no validation split (only split="train"); errors name data.path.
    """
    target = ("paraphrase" if cfg.paraphrases else "caption") if text else "label"
    if cfg.dataset == "digits":
        from patchflow.data.digits import DigitsDataset

        return DigitsDataset(split=split, seed=cfg.seed)
    if cfg.dataset == "color-digits":
        from patchflow.data.color_digits import ColorDigitsDataset

        share = cfg.number_share if split == "train" else NUMBER_SHARE  # held-out items keep the world's proportions
        return ColorDigitsDataset(split=split, seed=cfg.seed, target=target, number_share=share)
    if cfg.dataset == "moving-digits":
        from patchflow.data.moving_digits import MovingDigitsDataset

        return MovingDigitsDataset(split=split, seed=cfg.seed, frames=cfg.frames, target=target,
                                   start_grid=cfg.start_grid)
    if cfg.dataset not in ("folder", "captions", "video"):
        raise ValueError(f"unknown data.dataset {cfg.dataset!r}")
    if split != "train":
        raise ValueError(f"data.dataset = {cfg.dataset!r} has no {split!r} split; it is all training data")
    if not cfg.path.strip():
        raise ValueError(f"data.path is required for data.dataset = {cfg.dataset!r}")
    common = dict(image_size=cfg.image_size, channels=cfg.channels, alpha_background=cfg.alpha_background)
    try:
        if cfg.dataset == "folder":
            from patchflow.data.folder import ImageFolderDataset

            return ImageFolderDataset(cfg.path, **common)
        if cfg.dataset == "captions":
            from patchflow.data.captions import ImageCaptionDataset

            return ImageCaptionDataset(cfg.path, frames=cfg.frames, short_clips=cfg.short_clips, **common)
        from patchflow.data.video import VideoFolderDataset

        return VideoFolderDataset(cfg.path, cfg.frames, short_clips=cfg.short_clips, **common)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        # the message gains the key; the type stays one the CLI reports with exit code 2
        kind = next(t for t in (FileNotFoundError, NotADirectoryError, ValueError) if isinstance(e, t))
        raise kind(f"data.path = {cfg.path!r}: {e}") from None


def item_text(dataset, i: int) -> str:
    """The caption of item i of a captioned data set, without loading its image or clip."""
    if hasattr(dataset, "caption"):  # a built-in world
        return dataset.caption(i, paraphrase=dataset.target == "paraphrase")
    return dataset.items[i][1]  # ImageCaptionDataset: (image or clip path, caption, ...)


def item_frames(dataset) -> list[int] | None:
    """The frame count T of every item of a captions file (through WithCaptions): 1 for an image line, data.frames
    for a clip line; nothing is loaded. None for the other data sets, whose items all have `pixel_shape`'s frames
    (but the images of data.mix_images, 1)."""
    if isinstance(dataset, WithCaptions):
        dataset = dataset.texts
    frames = getattr(dataset, "item_frames", None)
    return None if frames is None else list(frames)


def check_dense_frames(dataset, model_frames: int, latent_frames=None) -> None:
    """Dense batches (no data.buckets, no train.pack_tokens) stack items of one size: every item of a captions file
    must have the frames the model trains at, model.frames (`latent_frames` maps an item's frames to the model's,
    through a codec; None: the same). ValueError naming the file's lines and the fixes otherwise; None for other
    data sets."""
    frames = item_frames(dataset)
    if frames is None:
        return
    source = dataset.texts if isinstance(dataset, WithCaptions) else dataset
    latent = latent_frames or (lambda t: t)
    bad = [e for e, t in zip(source.items, frames) if latent(t) != model_frames]
    if not bad:
        return
    images = [e for e in bad if e.kind == "image"]
    clips = [e for e in bad if e.kind != "image"]

    def lines(es):
        return f"{len(es)} line{'s' * (len(es) != 1)} of it (e.g. line {es[0].line})"

    problems, size = [], source.image_size
    if images:
        problems.append(f"{lines(images)} name images, one-frame items, but model.frames = {model_frames}: a batch "
                        f"stacks items of one size. Keep the images as one-frame items with data.buckets holding a "
                        f"one-frame bucket, e.g. data.buckets = [[1, {size}, {size}, 16], [{source.frames}, {size}, "
                        f"{size}, 4]] (or with train.pack_tokens; both need model.arch = \"video\"), or leave the "
                        f"images out of the file")
    if clips:
        problems.append(f"{lines(clips)} name clips, read as data.frames = {source.frames} frames, but model.frames "
                        f"= {model_frames}: train clips with model.arch = \"video\" and model.frames = data.frames "
                        f"(images too then need data.buckets with a one-frame bucket), or set data.frames = 1 to "
                        f"keep only each clip's first frame")
    raise ValueError(f"data.path = {str(source.path)!r}: " + "; ".join(problems))


class WithCaptions(torch.utils.data.Dataset):
    """Items (x, caption): x from `inputs` (e.g. a latent cache, item i of the same data), the caption of item i
    from the captioned data set `texts`."""

    def __init__(self, inputs, texts):
        if len(inputs) != len(texts):
            raise ValueError(f"{len(inputs)} inputs but {len(texts)} captions; the latent cache is not of this data")
        self.inputs, self.texts = inputs, texts

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return self.inputs[i][0], self.captions()[i]

    def captions(self) -> list[str]:
        """Every caption, in item order; computed once (a world draws an item's layout to caption it)."""
        if not hasattr(self, "_captions"):
            self._captions = [item_text(self.texts, i) for i in range(len(self))]
        return self._captions


def images_config(cfg: DataConfig) -> DataConfig:
    """The color-digits data whose images a moving-digits run mixes in (data.mix_images)."""
    return dataclasses.replace(cfg, dataset="color-digits", buckets=[], mix_images=0)


def mix_images(clips, images, n: int) -> torch.utils.data.ConcatDataset:
    """The clips, then the first n images (one-frame clips): items (x (C, T, H, W), caption)."""
    if n > len(images):
        raise ValueError(f"data.mix_images = {n} asks for more images than the {len(images)} there are")
    return torch.utils.data.ConcatDataset([clips, torch.utils.data.Subset(images, range(n))])


def captions_of(dataset) -> list[str]:
    """Every caption of a captioned data set (or WithCaptions, a mix, a cut), in item order."""
    if isinstance(dataset, WithCaptions):
        return dataset.captions()
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [c for part in dataset.datasets for c in captions_of(part)]
    if isinstance(dataset, torch.utils.data.Subset):
        every = captions_of(dataset.dataset)
        return [every[i] for i in dataset.indices]
    if isinstance(getattr(dataset, "dataset", None), torch.utils.data.Dataset):  # CutClips, WithFeatures
        return captions_of(dataset.dataset)
    return [item_text(dataset, i) for i in range(len(dataset))]


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless batches of indices; epoch e is a permutation seeded by (seed, e), last partial batch dropped.

    Batch b is a pure function of (seed, b), so a run resumed at batch b sees exactly the data it would have.
    `batch_size` is the global batch; with shard = (rank, world) each process gets its contiguous slice, so
    N processes together see exactly what one process sees, whatever N is.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, start: int = 0, shard: tuple[int, int] = (0, 1)):
        if size < batch_size:
            raise ValueError(f"the data set has {size} items, fewer than one batch of {batch_size}; "
                             f"lower train.batch_size or add data")
        rank, world = shard
        if batch_size % world:
            raise ValueError(f"train.batch_size = {batch_size} (the global batch) is not divisible by the "
                             f"{world} processes")
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.local = batch_size // world
        self.offset = rank * self.local
        self.per_epoch = size // batch_size

    def _perm(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch, not per batch
            self._epoch = epoch
            self._cached = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return self._cached

    def batch(self, b: int) -> list[int]:
        epoch, offset = divmod(b, self.per_epoch)
        return self._perm(epoch)[offset * self.batch_size:(offset + 1) * self.batch_size].tolist()

    def __iter__(self):
        b = self.start
        while True:
            yield self.batch(b)[self.offset:self.offset + self.local]
            b += 1
