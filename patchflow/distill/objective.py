"""The distillation objective: a student that samples in few Euler steps fitted to its teacher's guided sampler.

Both methods fit one student step to several teacher steps, on the student's grid (the teacher's shifted grid, every
`substeps`-th point): from x_s (a training item noised to grid time s), the teacher's guided Euler steps reach x_s'
at the next student time s', and the student's velocity at (x_s, s) is fitted to (x_s' - x_s) / (s' - s), the one
Euler step that lands there. A DDPM teacher is the same with DDIM steps (eta 0) on the respaced timesteps its student
samples at: the student's output (eps, v or x0) is the one whose DDIM step lands where the teacher's did.
"trajectory" does this once, student steps from teacher steps directly; "progressive" (Salimans & Ho 2022) halves
the steps per round, two teacher steps per student step, each round's teacher the student before it. Guidance is
folded in: the student samples at guidance 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from patchflow.flow import rectified
from patchflow.flow.config import FlowConfig
from patchflow.flow.ddpm import GaussianDiffusion, _gather, spaced_indices
from patchflow.flow.draws import global_draw
from patchflow.flow.objective import DiffusionObjective, RectifiedFlowObjective, draw_noise
from patchflow.flow.samplers import flow_timesteps


@dataclass
class TeacherStep:
    """What the loss needs of the teacher at one training step: fn(x, t) its guided velocity (t: (B,) in model
    units), the student's steps and the teacher steps each one spans."""
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int
    substeps: int


def span_times(steps: int, substeps: int, shift: float, index: torch.Tensor) -> torch.Tensor:
    """(B, substeps + 1) teacher times in [0, 1] from student step `index` (B,) to the next: the shifted grid of
    steps * substeps teacher steps, so every substeps-th time is the student's own grid (flow_timesteps(steps))."""
    grid = flow_timesteps(steps * substeps, shift).to(index.device, torch.float32)
    return grid[index[:, None] * substeps + torch.arange(substeps + 1, device=index.device)]


def euler_path(velocity_fn, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Euler steps along per-sample times (B, K + 1) in [0, 1]; velocity_fn(x, t) with t: (B,) in [0, 1]."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    for j in range(times.shape[1] - 1):
        x = x + (times[:, j + 1] - times[:, j]).reshape(shape) * velocity_fn(x, times[:, j])
    return x


def step_velocity(x: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """The velocity whose one Euler step takes x at time t (B,) to x_next at t_next (B,)."""
    return (x_next - x) / (t_next - t).reshape((-1,) + (1,) * (x.ndim - 1))


def student_draws(x0: torch.Tensor, cfg: FlowConfig, generator, shard, teacher: TeacherStep | None):
    """(student step (B,), noise like x0) for a batch, drawn for the global batch."""
    if teacher is None:
        raise ValueError("a distillation loss needs its teacher (a TeacherStep)")
    index = global_draw(x0, generator, shard, lambda n: torch.randint(
        teacher.steps, (n,), generator=generator, device=x0.device))
    return index, draw_noise(x0, cfg, generator, shard)


class DistillObjective:
    """loss() fits a student to a TeacherStep; sample() is the rectified flow's own sampler (a student is an
    ordinary run)."""
    t_max = rectified.TIME_SCALE

    def __init__(self, cfg: FlowConfig, frames_per_token: int = 1):
        self.cfg = cfg
        self.flow = RectifiedFlowObjective(cfg, frames_per_token)

    def loss(self, model_fn, x0, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1),
             teacher: TeacherStep | None = None) -> torch.Tensor:
        """Per-sample loss (B,) for x0 (B, C, [T,] H, W): a student step drawn per item, the teacher's guided steps
        over it without gradients, the student's velocity against the step that lands where the teacher did."""
        if isinstance(x0, (list, tuple)):
            raise ValueError("distillation takes dense batches; set train.pack_tokens = 0")
        index, noise = student_draws(x0, self.cfg, generator, shard, teacher)
        times = span_times(teacher.steps, teacher.substeps, self.cfg.shift, index)
        xt = rectified.interpolate(x0, noise, times[:, 0])
        with torch.no_grad():
            landed = euler_path(lambda x, t: teacher.fn(x, t * self.t_max), xt, times)
            target = step_velocity(xt, landed, times[:, 0], times[:, -1]).float()
        pred = model_fn(xt, times[:, 0] * self.t_max)
        return (pred.float() - target).pow(2).flatten(1).mean(1)

    def sample(self, *args, **kwargs) -> torch.Tensor:
        return self.flow.sample(*args, **kwargs)


# ---- DDPM teachers: DDIM steps ------------------------------------------------------------------------------------
def ddim_span(num_timesteps: int, steps: int, substeps: int, index: torch.Tensor) -> torch.Tensor:
    """(B, substeps + 1) int64 original timesteps from student step `index` (B,) to the next, the student's grid being
    the `steps` respaced timesteps DDIM samples at (spaced_indices), then -1 (clean); `substeps` teacher steps evenly
    between (repeats, where an interval is shorter, are steps of length 0)."""
    grid = np.append(spaced_indices(num_timesteps, steps)[::-1], -1)
    spans = np.rint(np.linspace(grid[:-1], grid[1:], substeps + 1, axis=1)).astype(np.int64)
    return torch.from_numpy(spans).to(index.device)[index]


def _acp(diffusion: GaussianDiffusion, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at original timesteps t (B,), 1 at t = -1, shaped to broadcast against x."""
    return _gather(np.append(diffusion.alphas_cumprod, 1.0), t, x)  # index -1: the appended 1


def ddim_path(model_fn, diffusion: GaussianDiffusion, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM steps along per-sample original timesteps (B, K + 1); model_fn(x, t) with float t (B,)."""
    channels = x.shape[1]
    for j in range(times.shape[1] - 1):
        t = times[:, j]
        x0, eps = diffusion.x0_eps(model_fn(x, t.float())[:, :channels], x, t)
        a = _acp(diffusion, times[:, j + 1], x)
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return x


def ddim_target(diffusion: GaussianDiffusion, x: torch.Tensor, landed: torch.Tensor, t: torch.Tensor,
                t_next: torch.Tensor) -> torch.Tensor:
    """The model output (the diffusion's prediction: eps, v or x0) whose one DDIM step takes x at t to `landed` at
    t_next: x0 from landed = sqrt(a') x0 + sqrt(1 - a') (x - sqrt(a) x0) / sqrt(1 - a), then its eps."""
    a, a_next = _acp(diffusion, t, x), _acp(diffusion, t_next, x)
    c = ((1 - a_next) / (1 - a)).sqrt()
    x0 = (landed - c * x) / (a_next.sqrt() - c * a.sqrt())
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return diffusion.prediction_target(x0, eps, t)


class DiffusionDistillObjective:
    """A DDPM teacher's DDIM student: loss() as DistillObjective's on DDIM steps; sample() the diffusion's own."""

    def __init__(self, cfg: FlowConfig, learn_sigma: bool):
        self.cfg = cfg
        self.objective = DiffusionObjective(cfg, learn_sigma)
        self.diffusion, self.t_max = self.objective.diffusion, self.objective.t_max

    def loss(self, model_fn, x0: torch.Tensor, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1), teacher: TeacherStep | None = None) -> torch.Tensor:
        index, noise = student_draws(x0, self.cfg, generator, shard, teacher)
        times = ddim_span(self.diffusion.num_timesteps, teacher.steps, teacher.substeps, index)
        xt = self.diffusion.q_sample(x0, times[:, 0], noise)
        with torch.no_grad():
            landed = ddim_path(teacher.fn, self.diffusion, xt, times)
            target = ddim_target(self.diffusion, xt, landed, times[:, 0], times[:, -1]).float()
        pred = model_fn(xt, times[:, 0].float())[:, :x0.shape[1]]  # a learned variance is not distilled
        return (pred.float() - target).pow(2).flatten(1).mean(1)

    def sample(self, *args, **kwargs) -> torch.Tensor:
        return self.objective.sample(*args, **kwargs)
