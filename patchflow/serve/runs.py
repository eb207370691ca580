"""The runs a server serves: their directories checked before anything loads, short names, and what the page and
the API offer for each loaded one (`ServedRun`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchflow.serve.requests import LIMITS


@dataclass
class ServedRun:
    """A loaded run and what the page and the API offer for it."""
    name: str
    path: Path
    pipe: object  # patchflow.pipeline.Pipeline
    example: str | None = None  # a caption of its data, shown as the prompt box's placeholder
    class_names: list[str] | None = None  # a class run on class folders: label -> folder name (classes.json)

    @property
    def kind(self) -> str:
        """'class', 'text' or 'video' (RunKind.name)."""
        return self.pipe.cfg.kind.name

    @property
    def size_step(self) -> int:
        """Pixels per token side: sizes must be multiples of it."""
        m = self.pipe.cfg.model
        return m.patch_size * (self.pipe.pixel_size(None)[0] // m.input_size)

    @property
    def takes_first_frame(self) -> bool:
        cfg = self.pipe.cfg
        return cfg.kind.video and cfg.flow.objective == "rectified"  # given frames need a flow

    def info(self) -> dict:
        cfg, pipe = self.pipe.cfg, self.pipe
        h, w = pipe.pixel_size(None)
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "arch": cfg.model.arch,
                "steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "sampler": cfg.sample.sampler,
                "height": h, "width": w, "size_step": self.size_step, "sizes": not cfg.kind.labels,
                "frames": pipe.pixel_frames() if cfg.kind.video else None, "first_frame": self.takes_first_frame,
                "example": self.example,
                "num_classes": cfg.model.num_classes if cfg.kind.labels else None, "class_names": self.class_names,
                "limits": dict(LIMITS)}


def run_names(paths: list[Path]) -> list[str]:
    """Short unique names: the folder name, or more of the path where two runs share it."""
    short = [p.name or str(p) for p in paths]
    names = [n if short.count(n) == 1 else "/".join(p.parts[-2:]) for n, p in zip(short, paths)]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def check_runs(runs: list[str | Path]) -> list[Path]:
    """The run directories, checked before anything loads: each exists and holds a sampling run."""
    from patchflow.run_dir import load_run_config

    if not runs:
        raise ValueError("give at least one run directory: patchflow serve RUN [RUN ...]")
    paths = [Path(r).expanduser() for r in runs]
    for p in paths:
        cfg = load_run_config(p)  # FileNotFoundError naming config.toml when p is not a run
        if cfg.kind.codec:
            raise ValueError(f"{p} is a codec run: it encodes and decodes, it does not sample; serve a model run")
    if len(set(p.resolve() for p in paths)) < len(paths):
        raise ValueError("a run is given twice")
    return paths


def example_prompt(cfg) -> str | None:
    """A caption of the run's data (a held-out one for the built-in worlds); None for class runs or when the
    data is not where the run was trained."""
    from patchflow.pipeline import preview_prompts

    if not cfg.kind.prompts:
        return None
    try:
        return preview_prompts(cfg, 1)[0]
    except (ValueError, OSError, KeyError, IndexError):
        return None


def class_names(run_dir: Path) -> list[str] | None:
    """The class folder names a class run trained on (RUN/classes.json), or None (a built-in world, or a file
    that is not a list of names: the page then shows numbers)."""
    import json

    try:
        names = json.loads((run_dir / "classes.json").read_text())
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None
