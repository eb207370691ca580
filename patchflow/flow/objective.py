"""The training objective and its sampler behind one small interface, so the trainer and the pipeline
never branch on flow vs diffusion. model_fn(x, t) always takes t in the model's units (0..1000)."""
from __future__ import annotations

import torch

from patchflow.config import FlowConfig
from patchflow.flow import rectified, samplers
from patchflow.flow.ddpm import GaussianDiffusion


def global_draw(x0: torch.Tensor, generator, shard: tuple[int, int], draw):
    """Draw for the whole global batch (world x local) and keep this rank's slice, so a run on N processes
    sees exactly the noise and timesteps that one process with the same global batch would."""
    rank, world = shard
    b = x0.shape[0]
    return draw(b * world)[rank * b:(rank + 1) * b]


class RectifiedFlowObjective:
    t_max = rectified.TIME_SCALE

    def __init__(self, cfg: FlowConfig):
        self.cfg = cfg

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Per-sample loss (B,). shard = (rank, world): x0 is this rank's part of a global batch."""
        c = self.cfg
        t = global_draw(x0, generator, shard, lambda n: rectified.sample_timesteps(
            n, c.timestep_sampling, logit_mean=c.logit_mean, logit_std=c.logit_std, mode_scale=c.mode_scale,
            generator=generator, device=x0.device))
        t = rectified.shift_timesteps(t, c.shift)
        noise = global_draw(x0, generator, shard, lambda n: torch.randn(
            (n, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype))
        return rectified.flow_loss(lambda x, s: model_fn(x, s * self.t_max), x0, noise, t)

    def sample(self, model_fn, noise: torch.Tensor, steps: int, sampler: str = "euler", progress=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate the learned ODE from noise (t=1) to data (t=0)."""
        step = {"euler": samplers.euler, "heun": samplers.heun}.get(sampler)
        if step is None:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose one of: {', '.join(samplers.SAMPLERS)}")
        return step(lambda x, t: model_fn(x, t * self.t_max), noise, samplers.flow_timesteps(steps, self.cfg.shift),
                    progress=progress)


class DiffusionObjective:
    t_max = 1000.0

    def __init__(self, cfg: FlowConfig, learn_sigma: bool):
        self.diffusion = GaussianDiffusion.from_config(cfg, learn_sigma)  # cfg.schedule, cfg.prediction
        self.t_max = float(cfg.num_timesteps)

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        t = global_draw(x0, generator, shard,
                         lambda n: self.diffusion.sample_timesteps(n, generator=generator, device=x0.device))
        noise = global_draw(x0, generator, shard, lambda n: torch.randn(
            (n, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype))
        return self.diffusion.training_losses(model_fn, x0, t, noise)["loss"]

    def sample(self, model_fn, noise: torch.Tensor, steps: int, sampler: str = "ddpm", progress=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral DDPM or DDIM (eta 0) on `steps` respaced timesteps; `generator` (on noise's device) draws
        the ancestral noise."""
        diffusion = self.diffusion.respace(steps)
        progress = progress or False
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, noise.shape, noise=noise, generator=generator, progress=progress)
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(model_fn, noise.shape, noise=noise, generator=generator,
                                              progress=progress)
        raise ValueError(f"unknown diffusion sampler {sampler!r}; choose one of: 'ddpm', 'ddim'")


def build_objective(cfg: FlowConfig, learn_sigma: bool = False):
    if cfg.objective == "rectified":
        return RectifiedFlowObjective(cfg)
    return DiffusionObjective(cfg, learn_sigma)


def objective_for_run(cfg):
    """The objective a run trains with: its flow, or an autoencoder's reconstruction loss for a codec run."""
    if cfg.model.arch == "autoencoder":
        from patchflow.codecs.autoencoder import AutoencoderObjective

        return AutoencoderObjective(cfg.model)
    return build_objective(cfg.flow, cfg.model.learn_sigma)
