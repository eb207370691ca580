"""REPA's frozen vision encoders: a local `transformers` DINOv2 / SigLIP / CLIP vision directory, or patchflow's own
world encoder (trained self-supervised on a data set's training split; patchflow.vision.world)."""
from __future__ import annotations

from pathlib import Path

from patchflow.vision.base import VisionEncoder, VisionError
from patchflow.vision.hf import TransformersVisionEncoder, is_transformers_dir
from patchflow.vision.world import (WorldEncoder, WorldRecipe, default_world_dir, is_world_dir,
                                    train_world_encoder)

__all__ = ["VisionEncoder", "VisionError", "WorldRecipe", "load_vision_encoder", "train_world_encoder"]


def load_vision_encoder(spec: str, data_cfg, progress: bool = True, train_missing: bool = True,
                        world_steps: int = WorldRecipe.steps) -> VisionEncoder:
    """repa.encoder: "world" (the data set's world encoder of `world_steps` training steps, trained into
    $PATCHFLOW_CACHE the first time when `train_missing`) or a directory (a transformers vision model, or one
    `patchflow encoder` wrote)."""
    spec = spec.strip()
    if spec == "world":
        recipe = WorldRecipe(steps=world_steps)
        directory = default_world_dir(data_cfg, recipe)
        if not is_world_dir(directory):
            if not train_missing:
                raise VisionError(f"the world encoder {directory} is missing; the main process trains it")
            if progress:
                print(f"training the world encoder of {data_cfg.dataset} into {directory} (once)")
            train_world_encoder(data_cfg, directory, recipe, progress=progress)
        return WorldEncoder(directory)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise VisionError(f"repa.encoder = {spec!r}: no such directory; give a transformers vision model saved with "
                          f"save_pretrained (DINOv2, SigLIP, CLIP), one `patchflow encoder CONFIG --out DIR` wrote, "
                          f"or \"world\"")
    if is_world_dir(path):
        return WorldEncoder(path)
    if is_transformers_dir(path):
        return TransformersVisionEncoder(path)
    raise VisionError(f"repa.encoder = {spec!r}: the directory has neither config.json (a transformers model) nor "
                      f"encoder.json (a world encoder); it is incomplete or not an encoder")
