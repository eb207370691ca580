"""The [flow] section: the training objective (rectified flow or DDPM) and its settings."""
from __future__ import annotations

from dataclasses import dataclass

from patchflow.checks import ConfigError, choice, positive
from patchflow.flow.ddpm import PREDICTIONS, SCHEDULES
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
        positive("flow.num_timesteps", self.num_timesteps)
        if self.objective == "ddpm" and not 21 <= self.num_timesteps <= 100_000:  # linear betas reach 20 / T
            raise ConfigError(f"flow.num_timesteps must be in 21..100000 for flow.objective = 'ddpm' (the linear "
                              f"schedule's last beta, 20 / num_timesteps, must stay below 1), got {self.num_timesteps}")
