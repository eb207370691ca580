"""The training objective and its sampler behind one small interface, so the trainer and the pipeline
never branch on flow vs diffusion. model_fn(x, t) always takes t in the model's units (0..1000)."""
from __future__ import annotations

import torch

from patchflow.flow.config import FlowConfig
from patchflow.flow import rectified, samplers
from patchflow.flow.ddpm import GaussianDiffusion
from patchflow.flow.draws import global_draw
from patchflow.flow.noise import frame_noise


def draw_noise(x0: torch.Tensor, cfg: FlowConfig, generator, shard) -> torch.Tensor:
    """Training noise like x0 (B, ...), drawn for the global batch, correlated across frames by flow.frame_noise."""
    return global_draw(x0, generator, shard, lambda n: frame_noise(
        (n, *x0.shape[1:]), cfg.frame_noise, cfg.frame_noise_alpha,
        lambda shape: torch.randn(shape, generator=generator, device=x0.device, dtype=x0.dtype)))


class RectifiedFlowObjective:
    t_max = rectified.TIME_SCALE

    def __init__(self, cfg: FlowConfig, frames_per_token: int = 1):
        self.cfg = cfg
        self.unit = frames_per_token  # given context frames come in whole tubelets

    def _times(self, n: int, generator, device) -> torch.Tensor:
        c = self.cfg
        t = rectified.sample_timesteps(n, c.timestep_sampling, logit_mean=c.logit_mean, logit_std=c.logit_std,
                                       mode_scale=c.mode_scale, generator=generator, device=device)
        return rectified.shift_timesteps(t, c.shift)

    def loss(self, model_fn, x0, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Per-sample loss (B,). shard = (rank, world): x0 is this rank's part of a global batch. x0: (B, C, T, H, W)
        (or (B, C, H, W)), or a list of clips of different sizes for a packing model.

        With flow.context_prob > 0, that share of multi-frame clips is trained as a continuation: leading frames
        given clean (frame 0 alone, image-to-video, half of the time; else 1..T-1 frames, extension), their timestep
        0 and their error left out of the loss; the model gets one timestep per frame."""
        if isinstance(x0, (list, tuple)):
            return self._packed_loss(model_fn, list(x0), generator, shard)
        t = global_draw(x0, generator, shard, lambda n: self._times(n, generator, x0.device))
        noise = draw_noise(x0, self.cfg, generator, shard)
        given = self._context(x0, generator, shard)
        fn, contrast = (lambda x, s: model_fn(x, s * self.t_max)), self.cfg.contrastive
        if given is None:
            return rectified.flow_loss(fn, x0, noise, t, contrast)
        return rectified.context_flow_loss(fn, x0, noise, t, given, contrast)

    def _context(self, x0: torch.Tensor, generator, shard) -> torch.Tensor | None:
        """(B, T) bool, the given leading frames of each clip (None when no clip of the batch has any)."""
        prob, frames = self.cfg.context_prob, x0.shape[2] if x0.ndim == 5 else 1
        tokens = frames // self.unit
        if prob <= 0 or tokens < 2:
            return None
        u = global_draw(x0, generator, shard, lambda n: torch.rand(n, 2, generator=generator, device=x0.device))
        k = torch.where(u[:, 1] < 0.5, torch.ones_like(u[:, 1]), 1 + (u[:, 1] * 2 - 1) * (tokens - 1)).long()
        k = torch.where(u[:, 0] < prob, k.clamp(1, tokens - 1), torch.zeros_like(k)) * self.unit
        given = torch.arange(frames, device=x0.device)[None] < k[:, None]
        return given if bool(given.any()) else None

    def _packed_loss(self, model_fn, xs: list, generator, shard) -> torch.Tensor:
        """Clips of different sizes (one packed forward): per clip a timestep and noise; one number from the shared
        generator seeds this rank's draws, so every process's generator state stays equal (exact resume)."""
        rank = shard[0]
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator else None))
        g = torch.Generator().manual_seed(seed + rank)
        t = self._times(len(xs), g, "cpu").to(xs[0].device)
        c = self.cfg
        noise = [frame_noise((1, *x.shape), c.frame_noise, c.frame_noise_alpha,
                             lambda shape: torch.randn(shape, generator=g))[0].to(x.device, x.dtype) for x in xs]
        xt = [rectified.interpolate(x[None], e[None], ti[None])[0] for x, e, ti in zip(xs, noise, t)]
        pred = model_fn(xt, t * self.t_max)
        # contrastive flow matching pairs same-shaped items; clips of other sizes have no common target to push from
        return torch.stack([(p.float() - (e - x).float()).pow(2).mean() for p, e, x in zip(pred, noise, xs)])

    def sample(self, model_fn, noise: torch.Tensor, steps: int, sampler: str = "euler", progress=None,
               generator: torch.Generator | None = None, context: tuple | None = None,
               strength: float = 1.0, init: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate the learned ODE from noise (t=1) to data (t=0).

        context: (known (B, C, T, H, W), given (B, T) bool): the given frames are held at their known values with
        timestep 0 throughout (image-to-video, extension). init (B, C, T, H, W), the input of an edit: strength < 1
        runs the last `edit_steps(steps, strength)` steps of the schedule from `init` noised to that step's time
        (SDEdit; strength 0 returns `init`); keep (B, 1 or C, T, H, W) in [0, 1] (inpainting) holds that share of
        each value on init's own path (init noised by the sample's noise to the current time), at init at t=0.
        """
        step = {"euler": samplers.euler, "heun": samplers.heun}.get(sampler)
        if step is None:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose one of: {', '.join(samplers.SAMPLERS)}")
        check_edit(strength, init, keep, context)
        times = samplers.flow_timesteps(steps, self.cfg.shift)
        x = noise
        if strength < 1.0:
            run = edit_steps(steps, strength)
            if run == 0:
                return init.clone()
            times = times[steps - run:]
            x = rectified.interpolate(init, noise, times[:1].to(noise.dtype).expand(noise.shape[0]))
        fn = lambda x, t: model_fn(x, t * self.t_max)  # noqa: E731
        if keep is not None:  # the kept part moves along init's straight path: exact under Euler and Heun alike
            path = noise - init
            out = step(lambda x, t: keep * path + (1 - keep) * fn(x, t), x, times, progress=progress)
            return keep * init + (1 - keep) * out
        if context is None:
            return step(fn, x, times, progress=progress)
        known, given = context
        held = given[:, None, :, None, None]

        def held_fn(x, t):  # given frames: their known values at time 0, and no motion
            v = model_fn(torch.where(held, known, x), torch.where(given, 0.0, t[:, None]) * self.t_max)
            return v.masked_fill(held, 0.0)

        return step(held_fn, torch.where(held, known, x), times, progress=progress)


def edit_steps(steps: int, strength: float) -> int:
    """Sampling steps an edit of this strength runs: round(steps * strength), at least 1 unless strength is 0."""
    return 0 if strength <= 0 else max(1, round(steps * strength))


def check_edit(strength: float, init, keep, context) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 keeps the input, 1 redraws it all), got {strength}")
    if (strength < 1.0 or keep is not None) and init is None:
        raise ValueError("an edit (strength < 1 or a mask) needs the input to start from (init)")
    if keep is not None and context is not None:
        raise ValueError("a mask and given frames do not go together; a mask of whole frames holds frames too")


class DiffusionObjective:
    t_max = 1000.0

    def __init__(self, cfg: FlowConfig, learn_sigma: bool):
        self.cfg = cfg
        self.diffusion = GaussianDiffusion.from_config(cfg, learn_sigma)  # cfg.schedule, cfg.prediction
        self.t_max = float(cfg.num_timesteps)

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        t = global_draw(x0, generator, shard,
                         lambda n: self.diffusion.sample_timesteps(n, generator=generator, device=x0.device))
        noise = draw_noise(x0, self.cfg, generator, shard)
        return self.diffusion.training_losses(model_fn, x0, t, noise)["loss"]

    def sample(self, model_fn, noise: torch.Tensor, steps: int, sampler: str = "ddpm", progress=None,
               generator: torch.Generator | None = None, context: tuple | None = None, strength: float = 1.0,
               init: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral DDPM or DDIM (eta 0) on `steps` respaced timesteps; `generator` (on noise's device) draws
        the ancestral noise. Edits as in the flow's sampler: strength < 1 starts from `init` diffused to the
        `edit_steps(steps, strength)`-th step from the end; `keep` holds that share at init diffused to each step."""
        if context is not None:
            raise ValueError("given frames need a rectified-flow run (a diffusion model has one timestep per sample)")
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown diffusion sampler {sampler!r}; choose one of: 'ddpm', 'ddim'")
        check_edit(strength, init, keep, None)
        diffusion = self.diffusion.respace(steps)
        first, x = None, noise
        if strength < 1.0:
            run = edit_steps(steps, strength)
            if run == 0:
                return init.clone()
            first = run - 1
            x = diffusion.q_sample(init, torch.full((noise.shape[0],), first, device=noise.device), noise)
        edit = None if keep is None else (init, keep, noise)
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        return loop(model_fn, noise.shape, noise=x, generator=generator, progress=progress or False, first=first,
                    edit=edit)


def build_objective(cfg: FlowConfig, learn_sigma: bool = False, frames_per_token: int = 1):
    """The objective of a [flow] section; frames_per_token: a video model's temporal patch (given frames come in
    whole tubelets)."""
    if cfg.objective == "rectified":
        return RectifiedFlowObjective(cfg, frames_per_token)
    return DiffusionObjective(cfg, learn_sigma)
