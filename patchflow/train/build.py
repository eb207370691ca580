"""What the trainer builds for a run, by its kind: the trainable module, the objective, and the weights it starts
from (train.init_from). The one place in training that tells a codec run from a diffusion run, and a video model's
start from an image MMDiT."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from patchflow.distill.objective import DiffusionDistillObjective, DistillObjective
from patchflow.flow.objective import build_objective
from patchflow.models import build_model
from patchflow.repa.projector import Projector
from patchflow.init_weights import load_start

PROJECTOR = "repa_projector."  # its weights' prefix: training only, kept out of the EMA and the sampling weights


def build_trainable(cfg) -> nn.Module:
    """A diffusion run's model, or a codec run's autoencoder with its losses (and discriminator)."""
    if cfg.kind.codec:
        from patchflow.train.codec_model import AutoencoderModel

        return AutoencoderModel(cfg.model)
    return build_model(cfg.model)


def objective_for_run(cfg):
    """The objective a run trains with: its flow, a student's fit to its teacher (distill.teacher), or an
    autoencoder's reconstruction loss for a codec run."""
    if cfg.kind.codec:
        from patchflow.train.codec_model import AutoencoderObjective

        return AutoencoderObjective(cfg.model)
    if cfg.distill.enabled and cfg.flow.objective == "ddpm":
        return DiffusionDistillObjective(cfg.flow, cfg.model.learn_sigma)
    if cfg.distill.enabled:
        return DistillObjective(cfg.flow, getattr(cfg.model, "temporal_patch", 1))
    return build_objective(cfg.flow, cfg.model.learn_sigma, getattr(cfg.model, "temporal_patch", 1))


def attach_projector(cfg, net: nn.Module, feature_dim: int) -> None:
    """REPA: the trainable projector from the model's width to the encoder's, and the block it reads after."""
    net.repa_projector = Projector(cfg.model.hidden_size, feature_dim, cfg.repa.projector_dim)
    net.align_after = cfg.repa.depth


def split_projector(state: dict) -> tuple[dict, dict]:
    """A training model's state dict -> (the model's own weights, the projector's)."""
    own = {k: v for k, v in state.items() if not k.startswith(PROJECTOR)}
    return own, {k: v for k, v in state.items() if k.startswith(PROJECTOR)}


def load_init_weights(cfg, net: nn.Module, source: str) -> Path:
    """train.init_from into `net` (patchflow.init_weights.load_start): returns the file read."""
    return load_start(cfg.kind.video, net, source)
