"""The kind of a run, decided once from `model.arch`: what it learns from, what it takes and what it makes.

Every other module asks the run's `RunKind` (`RunConfig.kind`) instead of testing `model.arch` itself; a new kind
of run is one more `if` in `run_kind` and in `config.model_config_class` (its [model] dataclass), and a branch
where its behaviour really differs. No torch here: the report (which never imports torch) asks it too.

| kind    | archs             | conditioned on   | makes                      |
| ------- | ----------------- | ---------------- | -------------------------- |
| `class` | `dit`             | class labels     | images (clips when frames > 1) |
| `text`  | `mmdit`, `crossdit` | prompts        | images                     |
| `video` | `video`           | prompts          | clips, with given frames   |
| `codec` | `autoencoder`     | nothing          | reconstructions (no sampling) |
"""
from __future__ import annotations

from dataclasses import dataclass

from patchflow.checks import ConfigError, show

ARCHS = ("dit", "mmdit", "crossdit", "video", "autoencoder")  # model.arch, in the order messages list them


@dataclass(frozen=True)
class RunKind:
    name: str   # "class", "text", "video" or "codec"
    arch: str   # model.arch

    @property
    def labels(self) -> bool:
        """Conditioned on class labels (DiT)."""
        return self.name == "class"

    @property
    def prompts(self) -> bool:
        """Conditioned on prompts through a frozen text encoder (text-to-image and text-to-video)."""
        return self.name in ("text", "video")

    @property
    def video(self) -> bool:
        """A timestep per latent frame: given frames, extension, SDEdit of clips, buckets and packing."""
        return self.name == "video"

    @property
    def codec(self) -> bool:
        """Trains an autoencoder: no flow, no conditioning, no sampling."""
        return self.name == "codec"

    @property
    def what(self) -> str:
        """For messages: 'class-conditional', 'text-to-image', 'text-to-video' or 'a codec run'."""
        return {"class": "class-conditional", "text": "text-to-image", "video": "text-to-video",
                "codec": "a codec run"}[self.name]


def run_kind(arch: str) -> RunKind:
    """The kind of a run with this model.arch."""
    if arch == "dit":
        return RunKind("class", arch)
    if arch in ("mmdit", "crossdit"):
        return RunKind("text", arch)
    if arch == "video":
        return RunKind("video", arch)
    if arch == "autoencoder":
        return RunKind("codec", arch)
    raise ConfigError(f"model.arch = {show(arch)} is not allowed; choose one of: {', '.join(map(repr, ARCHS))}")
