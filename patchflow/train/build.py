"""What the trainer builds for a run, by its kind: the trainable module and the objective. The one place in
training that tells a codec run from a diffusion run."""
from __future__ import annotations

import torch.nn as nn

from patchflow.flow.objective import build_objective
from patchflow.models import build_model


def build_trainable(cfg) -> nn.Module:
    """A diffusion run's model, or a codec run's autoencoder with its losses (and discriminator)."""
    if cfg.kind.codec:
        from patchflow.train.codec_model import AutoencoderModel

        return AutoencoderModel(cfg.model)
    return build_model(cfg.model)


def objective_for_run(cfg):
    """The objective a run trains with: its flow, or an autoencoder's reconstruction loss for a codec run."""
    if cfg.kind.codec:
        from patchflow.train.codec_model import AutoencoderObjective

        return AutoencoderObjective(cfg.model)
    return build_objective(cfg.flow, cfg.model.learn_sigma, getattr(cfg.model, "temporal_patch", 1))
