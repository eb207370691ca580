"""Importers for third-party weights: official DiT checkpoints and diffusers DiT folders -> patchflow run dirs."""
from patchflow.convert.dit import (
    convert_diffusers_dit,
    convert_official_dit,
    diffusers_to_patchflow,
    official_to_patchflow,
)

__all__ = ["convert_diffusers_dit", "convert_official_dit", "diffusers_to_patchflow", "official_to_patchflow"]
