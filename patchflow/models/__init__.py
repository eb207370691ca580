"""Models. `build_model(cfg)` picks the class for `model.arch`."""
from __future__ import annotations

import torch.nn as nn


def build_model(cfg) -> nn.Module:
    """The trainable module of a run (RunConfig): a DiT, or for a codec run the autoencoder and its losses."""
    if cfg.model.arch == "autoencoder":
        from patchflow.codecs.autoencoder import AutoencoderModel

        return AutoencoderModel(cfg.model)
    from patchflow.models.dit import DiT

    return DiT(cfg.model)
