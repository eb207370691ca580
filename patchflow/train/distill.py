"""A distillation run's teacher (the [distill] section): the teacher run's model with its EMA weights, frozen beside
the student and guided at distill.guidance; in progressive rounds, the student's EMA at the start of each round."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from patchflow.checks import ConfigError
from patchflow.config import apply_overrides, from_dict
from patchflow.distill.objective import TeacherStep
from patchflow.flow.guidance import classifier_free
from patchflow.flow.rectified import TIME_SCALE
from patchflow.init_weights import check_base, weights_file
from patchflow.models import build_model
from patchflow.run_dir import load_into, load_run_config, load_weights

WEIGHTS = "teacher.safetensors"  # a checkpoint's teacher after the first progressive round (exact resume)


def teacher_config(cfg):
    """The teacher run's RunConfig, checked against the student's (same model and diffusion, a full run)."""
    d = cfg.distill
    try:
        teacher = load_run_config(d.teacher)
    except FileNotFoundError as e:
        raise ConfigError(f"distill.teacher = {d.teacher!r}: {e}") from None
    if teacher.kind.codec:
        raise ConfigError(f"distill.teacher = {d.teacher!r} is a codec run; a teacher is a diffusion run")
    if teacher.lora.enabled:
        raise ConfigError(f"distill.teacher = {d.teacher!r} is a LoRA run: merge it into a full run first "
                          f"(`patchflow lora merge {d.teacher} --out DIR`) and distill that")
    same = ("objective", "prediction", "schedule", "num_timesteps")
    if any(getattr(teacher.flow, k) != getattr(cfg.flow, k) for k in same):
        raise ConfigError(f"[flow] {', '.join(same)} differ from the teacher's ({d.teacher}/config.toml): a student "
                          f"predicts what its teacher predicts")
    if teacher.model != cfg.model:
        raise ConfigError(f"[model] differs from the teacher's ({d.teacher}/config.toml): a student starts from its "
                          f"teacher's weights, so it keeps its model")
    return teacher


class Teacher:
    """The frozen teacher of a distillation run on `device`; `at(step, ...)` gives the loss its TeacherStep."""

    def __init__(self, cfg, device: torch.device, resume: bool):
        d = cfg.distill
        self.cfg = teacher_config(cfg)
        path = weights_file(d.teacher)
        d.teacher_hash = check_base(d.teacher_hash, path, "--resume" if resume else "distill.teacher", role="teacher",
                                    since="the student was distilled from it", fix="restore it or distill again")
        self.model = build_model(self.cfg.model)
        load_into(self.model, load_weights(path), source=str(path))
        self.model.requires_grad_(False).eval().to(device)
        s = self.cfg.sample
        self.guidance = s.guidance if d.guidance < 0 else d.guidance
        self.interval = tuple(s.guidance_interval)
        self.t_max = float(self.cfg.flow.num_timesteps) if self.cfg.flow.objective == "ddpm" else TIME_SCALE
        self.steps, self.progressive = d.steps, d.method == "progressive"
        teacher_steps = d.teacher_steps or s.steps
        self.rounds = d.rounds(teacher_steps) if self.progressive else 1
        self.substeps = 2 if self.progressive else d.substeps(teacher_steps)
        self.round_steps = math.ceil(cfg.train.steps / self.rounds)
        self.round = 0  # the round whose teacher self.model holds

    def stage(self, step: int) -> tuple[int, int]:
        """(round, the student's steps) of 0-based training step `step`."""
        r = min(step // self.round_steps, self.rounds - 1)
        return r, self.steps * 2 ** (self.rounds - 1 - r)

    def at(self, step: int, ema, cond: dict, null: dict) -> TeacherStep:
        """The teacher of training step `step` for a batch's (cond, null); a progressive round's first step makes
        the student's EMA its teacher."""
        r, steps = self.stage(step)
        if r != self.round:
            self.load_round(ema.state_dict(keep=True), r)
        # a later round's teacher is a student: its guidance is folded in already
        fn = classifier_free(self.model, cond, null, self.guidance if self.round == 0 else 1.0, interval=self.interval,
                             t_max=self.t_max)
        return TeacherStep(fn, steps, self.substeps)

    def load_round(self, weights: dict, r: int) -> None:
        load_into(self.model, weights, source=f"the student's EMA of round {r}")
        self.round = r

    def files(self) -> dict:
        """What a checkpoint keeps of the teacher: a later round's teacher is no file elsewhere."""
        if self.round == 0:
            return {}
        return {WEIGHTS: {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}}


# a student's [train] unless --set says otherwise: a short fine-tune from the teacher's weights
STUDENT_TRAIN = {"steps": 150, "batch_size": 32, "grad_accum": 1, "lr": 1e-4, "warmup_steps": 0,
                 "lr_schedule": "constant", "ema_decay": 0.99, "ema_warmup": True, "checkpoint_every": 50,
                 "sample_every": 100}


def student_config(teacher: str | Path, steps: int, method: str | None = None, overrides=()):
    """`patchflow distill TEACHER --steps N`: the teacher's config with [distill], a student's [train]
    (STUDENT_TRAIN, starting from the teacher's EMA) and [sample] at N Euler steps (DDIM for a DDPM teacher)
    without guidance (folded in);
    REPA and adapters off. `overrides` (--set items) come last."""
    data = load_run_config(teacher).to_dict()
    data["train"].update(STUDENT_TRAIN, init_from=str(teacher))
    data["sample"].update(steps=steps, guidance=1.0, sampler="ddim" if data["flow"]["objective"] == "ddpm" else "euler")
    data["distill"] = {"teacher": str(teacher), "steps": steps, **({"method": method} if method else {})}
    data["repa"], data["lora"] = {}, {}
    return from_dict(apply_overrides(data, list(overrides)))
