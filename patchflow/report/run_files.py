"""The run directory's files for `patchflow report`, read leniently: log.jsonl, config.toml, eval.json, the weights'
header (the parameter count) and the sample grids. A damaged or missing file loses its part of the page, never the
page. Nothing here imports torch.
"""
from __future__ import annotations

import io
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOG_FIELDS = ("loss", "loss_avg", "grad_norm", "lr", "images_per_s", "steps_per_s", "mfu", "bad_steps")
TIMESTEP_BINS = 10  # loss_by_t: equal bins of t / t_max over [0, 1]; train.run_log imports it (one format)
SAMPLE_NAME = re.compile(r"^step_(\d+)\.(png|gif)$")
KINDS = {"dit": "class-conditional image DiT", "mmdit": "text-to-image MMDiT",
         "crossdit": "text-to-image cross-attention DiT", "video": "text-to-video DiT",
         "autoencoder": "autoencoder (codec)"}
MIME = {"PNG": "image/png", "GIF": "image/gif"}


@dataclass
class Log:
    """log.jsonl read leniently: one record per step (the last one written wins), and the lines that were not
    records."""
    records: list[dict] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


@dataclass
class Picture:
    """An image file ready to embed: its bytes, MIME type and pixel size."""
    data: bytes
    mime: str
    width: int
    height: int


def check_run_dir(run_dir: str | Path) -> Path:
    """The run folder, or an error that says what is wrong and what to pass instead."""
    run = Path(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such folder; pass a run directory (the --out of `patchflow train`)")
    if not run.is_dir():
        raise NotADirectoryError(f"{run} is a file, not a run directory; pass the folder that holds its "
                                 f"config.toml and log.jsonl")
    if not (run / "config.toml").is_file() and not (run / "log.jsonl").is_file():
        raise ValueError(f"{run} is not a run directory: it has no config.toml and no log.jsonl; pass the folder "
                         f"given to `patchflow train --out` (e.g. runs/demo)")
    return run


def _number(value) -> float | None:
    """A finite float, or None (JSON null, NaN, a string): a plot gap rather than a crash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _loss_bins(value) -> list[float | None] | None:
    """loss_by_t as TIMESTEP_BINS floats-or-None, or None when missing or malformed."""
    if not isinstance(value, list) or len(value) != TIMESTEP_BINS:
        return None
    return [_number(v) for v in value]


def _record(obj) -> dict | None:
    """A log record with its numbers checked, or None when `obj` is not one (no integer step)."""
    if not isinstance(obj, dict):
        return None
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None
    record = {"step": step, "skipped": obj.get("skipped") is True}
    record.update({key: _number(obj.get(key)) for key in LOG_FIELDS})
    record["loss_by_t"] = _loss_bins(obj.get("loss_by_t"))
    return record


def parse_log(lines: list[str]) -> Log:
    """Records from log.jsonl's lines, by step. A resumed run may repeat steps (the last record wins); a line cut by
    a kill, or otherwise not a record, is counted in bad_lines (1-based) rather than failing the report."""
    by_step, bad = {}, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _record(json.loads(line))
        except (ValueError, RecursionError):
            record = None
        if record is None:
            bad.append(number)
        else:
            by_step[record["step"]] = record
    return Log([by_step[s] for s in sorted(by_step)], bad)


def read_log(path: Path) -> Log:
    """log.jsonl (an empty Log when the run has none yet), warning once about lines that were skipped."""
    if not path.is_file():
        return Log()
    log = parse_log(path.read_text(errors="replace").splitlines())
    if log.bad_lines:
        shown = ", ".join(map(str, log.bad_lines[:10])) + (", ..." if len(log.bad_lines) > 10 else "")
        warnings.warn(f"{path}: skipped {len(log.bad_lines)} line(s) that are not JSON log records (line {shown})",
                      stacklevel=2)
    return log


def read_config(run: Path) -> tuple[str | None, dict]:
    """config.toml's text (None if absent) and its parsed tables ({} if it does not parse: the page still shows
    the text)."""
    path = run / "config.toml"
    if not path.is_file():
        return None, {}
    text = path.read_text(errors="replace")
    try:
        return text, tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        warnings.warn(f"{path}: not valid TOML ({e}); the report shows it as text only", stacklevel=2)
        return text, {}


def model_kind(config: dict) -> str:
    """What the run trains, from [model] arch (DiT when unset, as load_config reads it)."""
    model = config.get("model") if isinstance(config.get("model"), dict) else None
    if model is None:
        return "unknown (no readable config.toml)"
    arch = model.get("arch", "dit")
    return KINDS.get(arch, f"unknown arch {arch!r}") if isinstance(arch, str) else f"unknown arch {arch!r}"


def parameter_count(path: Path) -> int | None:
    """The number of values in a .safetensors file, read from its header only (no weights loaded); None when
    there is no such file or it cannot be read."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except Exception:  # noqa: BLE001 - a damaged file only loses this one figure of the page
        return None


def read_picture(path: Path) -> Picture | None:
    """A PNG or GIF file as a Picture; None when it is missing or not a readable PNG/GIF."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            mime, (width, height) = MIME.get(image.format), image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return Picture(data, mime, width, height) if mime else None


def sample_files(run: Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's samples/step_XXXXXXX.png|gif, by step."""
    folder = run / "samples"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SAMPLE_NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def evenly_spaced(items: list, k: int) -> list:
    """At most k of items, evenly spaced, the first and the last always kept (why: the start and the end of
    training are the grids one compares)."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def read_eval(path: Path) -> dict | None:
    """eval.json as a dict; None when absent; a one-entry dict naming the problem when it is not readable JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (ValueError, RecursionError) as e:
        return {"error": f"eval.json is not valid JSON ({e})"}
    return data if isinstance(data, dict) else {"value": data}
