"""The [data] section: which data set, and how its items are read."""
from __future__ import annotations

from dataclasses import dataclass, field

from patchflow.checks import ConfigError, choice, positive, show

WORLDS = ("digits", "color-digits", "moving-digits")  # the built-in data sets (need no data.path)
NUMBER_SHARE = 0.25  # the color-digits world's share of two-digit numbers (its validation split always keeps it)


@dataclass
class DataConfig:
    dataset: str = "digits"               # built in: "digits", "color-digits", "moving-digits"; "folder", "captions"
                                          # (JSONL of images and/or clips with captions), "video" (a folder of clips)
    seed: int = 0                         # seed of the train/validation split
    num_workers: int = 0
    path: str = ""                        # folder / captions .jsonl / video folder; unused by digits
    image_size: int = 32                  # shorter side resized to this, then centre-cropped square
    channels: int = 3                     # 3 (RGB) or 1 (grey); every image is converted to it
    frames: int = 8                       # video, and a captions file's clip lines: frames per clip
    alpha_background: str = "white"       # transparent pixels are composited over "white" or "black"
    short_clips: str = "skip"             # clips (video, captions) with < frames frames: "skip", "error" or "loop"
    paraphrases: bool = True              # text runs on the built-in worlds: mix paraphrased captions in (about
                                          # half) with the canonical ones, so the model learns words, not a template
    buckets: list[list] = field(default_factory=list)  # video: variable size, [[frames, height, width, batch_size
                                          # (, weight)], ...]; clips are cut to a bucket's frames (see docs/video.md)
    mix_images: int = 0                   # moving-digits: add this many color-digits images as one-frame clips
    start_grid: int = 0                   # moving-digits: start each clip with its digit on this pixel grid (0:
                                          # anywhere, as the world draws; 8: one token of the demo's model)
    number_share: float = NUMBER_SHARE    # color-digits: the share of two-digit numbers among the training items
                                          # (the world draws 0.25; its validation split always does)

    def validate(self) -> None:
        """Checks values only; whether `path` exists is checked when the data set is built (a run's saved
        config must still load for sampling after its data has moved)."""
        choice("data.dataset", self.dataset, WORLDS + ("folder", "captions", "video"))
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"data.seed must be in 0..2**31-1, got {self.seed}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.dataset not in WORLDS and not self.path.strip():
            what = {"folder": "an image folder", "captions": "a .jsonl captions file", "video": "a video folder"}
            raise ConfigError(f"data.path is required for data.dataset = {self.dataset!r}: {what[self.dataset]}")
        positive("data.image_size", self.image_size)
        choice("data.channels", self.channels, (1, 3))
        positive("data.frames", self.frames)
        choice("data.alpha_background", self.alpha_background, ("white", "black"))
        choice("data.short_clips", self.short_clips, ("skip", "error", "loop"))
        if self.buckets:
            from patchflow.data.buckets import parse_buckets

            try:
                parse_buckets(self.buckets)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.mix_images and self.dataset != "moving-digits":
            raise ConfigError("data.mix_images adds color-digits images to the moving-digits world; "
                              f"data.dataset = {show(self.dataset)}: leave it out")
        if self.start_grid and self.dataset != "moving-digits":
            raise ConfigError("data.start_grid aligns the starts of the moving-digits world's clips; "
                              f"data.dataset = {show(self.dataset)}: leave it out")
        if not 0 <= self.start_grid <= 32:
            raise ConfigError(f"data.start_grid must be 0 (starts anywhere) or a grid spacing of 1-32 px, "
                              f"got {self.start_grid}")
        if self.number_share != NUMBER_SHARE and self.dataset != "color-digits":
            raise ConfigError("data.number_share sets the share of numbers among the color-digits world's training "
                              f"items; data.dataset = {show(self.dataset)}: leave it out")
        if not 0 <= self.number_share <= 1:
            raise ConfigError(f"data.number_share must be a fraction in 0..1, got {self.number_share}")
        if not 0 <= self.mix_images <= 20_000:
            raise ConfigError(f"data.mix_images must be in 0..20000 (the color-digits training images), "
                              f"got {self.mix_images}")
