"""The runs a server serves: their directories checked before anything loads, short names, and what the page and
the API offer for each loaded one (`ServedRun`)."""
from __future__ import annotations

from dataclasses import dataclass, field
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
    loras: dict = field(default_factory=dict)  # adapter name -> (its file or run, Adapter) that fit this run
    base: dict | None = None  # the run's own sampling weights (CPU), which an adapter is merged into per request
    applied: tuple | None = None  # the (adapter name, scale) merged into the model now; None: the run itself

    def use(self, lora: str | None, scale: float = 1.0) -> None:
        """Put adapter `lora` at `scale` (or none) into the model, merged from the run's own weights, exactly as
        `patchflow sample RUN --lora FILE:SCALE` does; nothing to do when it is in already."""
        from patchflow.lora.adapters import merge
        from patchflow.weights import load_into

        want = None if lora is None else (lora, float(scale))
        if want == self.applied:
            return
        adapter = None if lora is None else self.loras[lora][1]
        weights = self.base if adapter is None else merge(self.base, [(adapter.weights, adapter.scale * scale)])
        load_into(self.pipe.model, weights, source=f"run {self.name!r} with adapter {lora!r}")
        self.applied = want

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
                "distilled": {"steps": cfg.distill.steps, "method": cfg.distill.method,
                              "teacher": cfg.distill.teacher} if cfg.distill.enabled else None,
                "height": h, "width": w, "size_step": self.size_step, "sizes": not cfg.kind.labels,
                "frames": pipe.pixel_frames() if cfg.kind.video else None, "first_frame": self.takes_first_frame,
                "init_image": not cfg.kind.video and cfg.model.frames == 1,
                "example": self.example,
                "num_classes": cfg.model.num_classes if cfg.kind.labels else None, "class_names": self.class_names,
                "loras": sorted(self.loras), "limits": dict(LIMITS)}


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
    from patchflow.previews import preview_prompts

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


def lora_names(specs: list[str]) -> dict[str, str]:
    """`--lora [NAME=]ADAPTER` -> {name: adapter}; the name defaults to the file's stem (a run: its folder)."""
    out = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = Path(spec).stem or Path(spec).name, spec
        if not name or not Path(source).expanduser().exists():
            raise ValueError(f"--lora {spec!r}: give [NAME=]ADAPTER, an existing adapter file or LoRA run")
        if name in out:
            raise ValueError(f"--lora: two adapters are named {name!r}; name them with NAME=ADAPTER")
        out[name] = str(Path(source).expanduser())
    return out


def fitting_loras(run: ServedRun, adapters: dict[str, str], ema: bool = True, why: dict | None = None) -> dict:
    """The adapters that fit a loaded run (its arch, base and shapes): {name: (source, Adapter)}; the rest are
    left out (another served run may take them), each with the reason in `why[name][run.name]`."""
    from patchflow.checks import ConfigError
    from patchflow.lora.apply import add, read_for
    from patchflow.lora.run import sampling_base

    cfg, fits = run.pipe.cfg, {}
    base = sampling_base(run.path, cfg, ema)
    for name, source in adapters.items():
        try:  # every check `patchflow sample --lora` makes
            adapter = read_for(source, cfg.model, base)
            add(run.base, adapter, 0.0, source)
        except (ConfigError, ValueError) as e:
            if why is not None:
                why.setdefault(name, {})[run.name] = str(e)
            continue
        fits[name] = (source, adapter)
    return fits
