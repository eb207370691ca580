"""A vision model in a local `transformers` directory (DINOv2, SigLIP or CLIP vision) as REPA's frozen encoder.

Images are resized to the model's `image_size` (with one warning when the data's size differs: a 32-pixel digit
would give DINOv2 a 2x2 grid), grey images are repeated to three channels, and pixels are normalised with the
directory's `preprocessor_config.json` (else the model family's usual mean and std). The features are the last
layer's patch tokens, without the class and register tokens."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from patchflow.vision.base import VisionEncoder, VisionError, fit_channels
from patchflow.weights import hash_files, safetensors_files

# model_type -> (transformers class name, tokens before the patches, default mean, default std)
FAMILIES = {
    "dinov2": ("Dinov2Model", 1, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip_vision_model": ("CLIPVisionModel", 1, (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)),
    "clip": ("CLIPVisionModel", 1, (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)),
    "siglip_vision_model": ("SiglipVisionModel", 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip": ("SiglipVisionModel", 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def is_transformers_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


class TransformersVisionEncoder(VisionEncoder):
    def __init__(self, path: str | Path):
        super().__init__()
        import transformers

        path = Path(path).expanduser()
        config_file = path / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise VisionError(f"{config_file} cannot be read as JSON ({e}): the encoder directory is incomplete; "
                              f"save it again with model.save_pretrained(DIR)") from e
        model_type = config.get("model_type", "")
        if model_type not in FAMILIES:
            raise VisionError(f"{path}: model_type {model_type!r} is not a vision encoder patchflow can align with; "
                              f"use a DINOv2, SigLIP or CLIP vision model ({', '.join(sorted(FAMILIES))})")
        weights = safetensors_files(path, VisionError)
        cls_name, self.prefix, mean, std = FAMILIES[model_type]
        try:
            self.model = getattr(transformers, cls_name).from_pretrained(path, local_files_only=True,
                                                                         use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise VisionError(f"{path}: transformers could not load it as a {cls_name} ({e})") from e
        self.model.eval().requires_grad_(False)
        vision = self.model.config
        self.prefix += int(getattr(vision, "num_register_tokens", 0) or 0)
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            p = json.loads(pre.read_text())
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        self.size, self.patch = int(vision.image_size), int(vision.patch_size)
        self.channels = int(getattr(vision, "num_channels", 3))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.name, self.dim, self.source = f"{model_type} ({path.name})", int(vision.hidden_size), str(path)
        digest = hash_files([config_file, *weights, *([pre] if pre.is_file() else [])])
        self._identity = {"kind": f"transformers:{model_type}", "sha256": digest[:16], "image_size": self.size,
                          "mean": list(mean), "std": list(std)}
        self._warned = False

    def identity(self) -> dict:
        return dict(self._identity)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) in [-1, 1] -> (N, image_size / patch, image_size / patch, hidden_size)."""
        x = fit_channels(x.float(), self.channels, self.source)
        if x.shape[-2:] != (self.size, self.size):
            if not self._warned:
                warnings.warn(f"repa.encoder {self.source} takes {self.size}x{self.size} images: the data's "
                              f"{x.shape[-2]}x{x.shape[-1]} are resized to it for the encoder", stacklevel=2)
                self._warned = True
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        tokens = self.model(pixel_values=x).last_hidden_state[:, self.prefix:]
        g = self.size // self.patch
        return tokens.reshape(x.shape[0], g, g, -1)
