"""The [distill] section: a few-step student trained from a teacher run's guided sampler."""
from __future__ import annotations

import math
from dataclasses import dataclass

from patchflow.checks import ConfigError, choice

METHODS = ("trajectory", "progressive")


@dataclass
class DistillConfig:
    teacher: str = ""                     # "" (off), or the teacher's run directory: its config and EMA weights
    method: str = "trajectory"            # "trajectory": each student step fitted to `substeps` guided teacher steps
                                          # (one stage); "progressive": rounds that halve the steps, each round's
                                          # teacher the previous round's student (Salimans & Ho 2022)
    steps: int = 4                        # the student's sampling steps (1..64)
    teacher_steps: int = 0                # the teacher's steps the student's span: 0 = the teacher's sample.steps
                                          # (progressive rounds up to steps * 2**rounds)
    guidance: float = -1.0                # the teacher's guidance, folded into the student (sampled at 1); -1 = the
                                          # teacher's sample.guidance
    teacher_hash: str = ""                # sha256 of the teacher's EMA weights, recorded at step 0; a resume refuses
                                          # a teacher that changed

    @property
    def enabled(self) -> bool:
        return bool(self.teacher.strip())

    def substeps(self, teacher_steps: int) -> int:
        """Teacher steps per student step (trajectory), from the teacher's step count."""
        return max(1, math.ceil(teacher_steps / self.steps))

    def rounds(self, teacher_steps: int) -> int:
        """Progressive rounds: each halves the steps, from steps * 2**rounds >= teacher_steps down to steps."""
        return max(1, math.ceil(math.log2(max(teacher_steps, 2 * self.steps) / self.steps) - 1e-9))

    def validate(self) -> None:
        choice("distill.method", self.method, METHODS)
        if not 1 <= self.steps <= 64:
            raise ConfigError(f"distill.steps must be in 1..64 (the student's sampling steps), got {self.steps}")
        if self.teacher_steps < 0 or self.teacher_steps > 1000:
            raise ConfigError(f"distill.teacher_steps must be in 0..1000 (0: the teacher's sample.steps), got "
                              f"{self.teacher_steps}")
        if self.guidance != -1.0 and not 0 <= self.guidance <= 100:
            raise ConfigError(f"distill.guidance must be in [0, 100], or -1 for the teacher's sample.guidance, got "
                              f"{self.guidance}")
