"""The [flow] section: the training objective (rectified flow or DDPM) and its settings."""
from __future__ import annotations

from dataclasses import dataclass

from patchflow.checks import ConfigError, choice, positive
from patchflow.flow.ddpm import PREDICTIONS, SCHEDULES
from patchflow.flow.noise import FRAME_NOISE
from patchflow.flow.rectified import TIMESTEP_SAMPLING
from patchflow.flow.samplers import SAMPLERS


def samplers_for(objective: str) -> tuple[str, ...]:
    """The samplers an objective allows (the one source for the config, the CLI, the Pipeline and the server)."""
    return SAMPLERS if objective == "rectified" else ("ddpm", "ddim")


@dataclass
class FlowConfig:
    objective: str = "rectified"          # "rectified" (flow matching) or "ddpm" (DiT's Gaussian diffusion)
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0                    # timestep shift for training and sampling (SD3 uses 3.0 at 1024px)
    num_timesteps: int = 1000             # DDPM schedule length
    prediction: str = "eps"               # ddpm: what the model predicts: "eps" (DiT), "v" (Salimans & Ho), "x0"
    schedule: str = "linear"              # ddpm: "linear" (DiT) or "cosine" (Nichol & Dhariwal)
    context_prob: float = 0.0             # video: share of training clips given their leading frames clean
                                          # (image-to-video, extension); needs a per-frame-timestep model ("video")
    frame_noise: str = "independent"      # video: noise correlated across frames in training and sampling (PYoCo):
                                          # "independent", "mixed" (a shared part) or "progressive" (a chain)
    frame_noise_alpha: float = 1.0        # how much frames share: correlation alpha^2 / (1 + alpha^2) ("mixed")
    contrastive: float = 0.0              # contrastive flow matching (Stoica et al. 2025): push the prediction away
                                          # from another batch item's target by this weight (0.05 in the paper)

    def validate(self) -> None:
        choice("flow.objective", self.objective, ("rectified", "ddpm"))
        choice("flow.prediction", self.prediction, PREDICTIONS)
        choice("flow.schedule", self.schedule, SCHEDULES)
        if self.objective == "rectified" and (self.prediction, self.schedule) != ("eps", "linear"):
            raise ConfigError("flow.prediction and flow.schedule are settings of flow.objective = \"ddpm\"; a "
                              "rectified flow always predicts the velocity on its straight path (leave them out)")
        choice("flow.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        positive("flow.logit_std", self.logit_std)
        positive("flow.shift", self.shift)
        if not 0 <= self.context_prob <= 1:
            raise ConfigError(f"flow.context_prob must be in [0, 1], got {self.context_prob}")
        if self.context_prob and self.objective != "rectified":
            raise ConfigError("flow.context_prob (given leading frames) is a rectified-flow setting")
        choice("flow.frame_noise", self.frame_noise, FRAME_NOISE)
        if not 0 <= self.frame_noise_alpha <= 100:
            raise ConfigError(f"flow.frame_noise_alpha must be in [0, 100], got {self.frame_noise_alpha}")
        if not 0 <= self.contrastive < 1:
            raise ConfigError(f"flow.contrastive must be in [0, 1) (the paper's 0.05; 1 would cancel the flow "
                              f"loss), got {self.contrastive}")
        if self.contrastive and self.objective != "rectified":
            raise ConfigError("flow.contrastive (contrastive flow matching) is a rectified-flow setting")
        positive("flow.num_timesteps", self.num_timesteps)
        if self.objective == "ddpm" and not 21 <= self.num_timesteps <= 100_000:  # linear betas reach 20 / T
            raise ConfigError(f"flow.num_timesteps must be in 21..100000 for flow.objective = 'ddpm' (the linear "
                              f"schedule's last beta, 20 / num_timesteps, must stay below 1), got {self.num_timesteps}")
