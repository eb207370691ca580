"""The distillation objective: a student that samples in few Euler steps fitted to its teacher's guided sampler.

Both methods fit one student step to several teacher steps, on the student's grid (the teacher's shifted grid, every
`substeps`-th point): from x_s (a training item noised to grid time s), the teacher's guided Euler steps reach x_s'
at the next student time s', and the student's velocity at (x_s, s) is fitted to (x_s' - x_s) / (s' - s), the one
Euler step that lands there. "trajectory" does this once, student steps from teacher steps directly;
"progressive" (Salimans & Ho 2022) halves the steps per round, two teacher steps per student step, each round's
teacher the student before it. Guidance is folded in: the student samples at guidance 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from patchflow.flow import rectified
from patchflow.flow.config import FlowConfig
from patchflow.flow.draws import global_draw
from patchflow.flow.objective import RectifiedFlowObjective, draw_noise
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
        if teacher is None:
            raise ValueError("a distillation loss needs its teacher (a TeacherStep)")
        if isinstance(x0, (list, tuple)):
            raise ValueError("distillation takes dense batches; set train.pack_tokens = 0")
        index = global_draw(x0, generator, shard, lambda n: torch.randint(
            teacher.steps, (n,), generator=generator, device=x0.device))
        noise = draw_noise(x0, self.cfg, generator, shard)
        times = span_times(teacher.steps, teacher.substeps, self.cfg.shift, index)
        xt = rectified.interpolate(x0, noise, times[:, 0])
        with torch.no_grad():
            landed = euler_path(lambda x, t: teacher.fn(x, t * self.t_max), xt, times)
            target = step_velocity(xt, landed, times[:, 0], times[:, -1]).float()
        pred = model_fn(xt, times[:, 0] * self.t_max)
        return (pred.float() - target).pow(2).flatten(1).mean(1)

    def sample(self, *args, **kwargs) -> torch.Tensor:
        return self.flow.sample(*args, **kwargs)
