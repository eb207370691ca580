"""The [codec] section: where a run's model inputs live (pixels or a codec's latents)."""
from __future__ import annotations

from dataclasses import dataclass

from patchflow.checks import ConfigError


@dataclass
class CodecConfig:
    """Where the model's inputs live: pixels ("identity") or the latents of a codec."""

    source: str = "identity"              # "identity" (pixels), a shipped codec preset ("codec-digits"; trained
                                          # first when not in $PATCHFLOW_CACHE), or a codec / run / diffusers dir
    cache: str = "auto"                   # latents precomputed once: "auto" ($PATCHFLOW_CACHE/latents, built before
                                          # training when missing), "off" (encode every batch), or a directory
                                          # written by `patchflow cache` (refused when it does not match)

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError("codec.source must not be empty: \"identity\" (pixels), a codec preset name or a "
                              "codec directory")
        if not self.cache.strip():
            raise ConfigError("codec.cache must not be empty: \"auto\", \"off\" or a cache directory")
