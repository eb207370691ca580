"""Representation alignment (REPA, Yu et al. 2024; its video form CREPA, Hwang et al. 2025).

The hidden states of the image tokens after block `repa.depth`, through a small trainable projector, are pulled
toward a frozen vision encoder's patch features of the clean input (each frame of a clip): the diffusion loss plus
`repa.weight` times a negative cosine similarity. The projector trains with the model and is saved in the run's
checkpoints, never in its sampling weights or exports.

    config.RepaConfig     the [repa] section
    projector.Projector   the trainable MLP from the model's width to the encoder's
    loss                  the alignment terms and the pooling of features to the model's token grid (pure functions)
"""
from patchflow.repa.config import RepaConfig

__all__ = ["RepaConfig"]
