"""The training side of the run directory's rules (the directory itself is patchflow/run_dir.py): what --resume
may continue, the write probe of --out, the log cut back to a checkpoint, the run's config.toml with the precision
that train.precision = "auto" chose, and failed writes turned into a TrainingError that names the last checkpoint."""
from __future__ import annotations

import dataclasses
import errno
import json
from contextlib import contextmanager
from pathlib import Path

from patchflow.config import ConfigError, RunConfig, load_config
from patchflow.run_dir import atomic_write_text, latest_checkpoint, step_of
from patchflow.train.errors import TrainingError

# config.toml's record of what train.precision = "auto" chose: comment lines after the TOML (config.toml stays a
# config that load_config reads, with precision = "auto"), read back on --resume so a run keeps its numerics
CHOSEN, RATES = "# precision_chosen = ", "# precision_rates = "


def check_resume(cfg: RunConfig, out: Path, resume: bool) -> None:
    """--resume needs the run's config.toml and keeps its model and codec; without --resume, --out must not hold
    a run yet."""
    config_path = out / "config.toml"
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume: {config_path} not found; nothing to resume in {out}")
        saved = load_config(config_path)
        if saved.model != cfg.model:
            raise ConfigError(f"--resume: [model] differs from the run's {config_path}; a run keeps its model")
        if saved.codec.source != cfg.codec.source:
            raise ConfigError(f"--resume: codec.source = {cfg.codec.source!r} differs from the run's "
                              f"{saved.codec.source!r} ({config_path}); a run keeps its codec")
        mine, theirs = (dataclasses.replace(c.lora, base_hash="", dropout=0.0) for c in (cfg, saved))
        if mine != theirs:
            raise ConfigError(f"--resume: [lora] (rank, alpha, targets, blocks) differs from the run's {config_path}; "
                              f"a run keeps its adapters")
        cfg.lora.base_hash = cfg.lora.base_hash or saved.lora.base_hash  # the base the adapters were trained on
        mine, theirs = (dataclasses.replace(c.distill, teacher_hash="") for c in (cfg, saved))
        if mine != theirs:
            raise ConfigError(f"--resume: [distill] differs from the run's {config_path}; a student keeps its teacher "
                              f"and method")
        cfg.distill.teacher_hash = cfg.distill.teacher_hash or saved.distill.teacher_hash
    elif config_path.is_file():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or pick another --out")


def describe_os_error(e: OSError) -> str:
    """'No space left on device [ENOSPC] at /path' from an OSError."""
    code = errno.errorcode.get(e.errno, f"errno {e.errno}") if e.errno else "no errno"
    where = f" at {e.filename}" if e.filename else ""
    return f"{e.strerror or e} [{code}]{where}"


def prepare_out_dir(out: Path) -> None:
    """Create the run directory and prove it is writable, so a bad --out fails before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the run directory {out}: {describe_os_error(e)}; "
                            f"pick another --out") from e


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(k + "\n" for k in keep))  # a second crash here must not lose the log


def last_checkpoint_note(out: Path) -> str:
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return f"No checkpoint was written yet in {out / 'checkpoints'}."
    return (f"The last good checkpoint {ckpt} (step {step_of(ckpt)}) is intact; "
            f"`patchflow train ... --out {out} --resume` continues from it.")


@contextmanager
def stop_on_os_error(what: str, step: int, out: Path):
    """A failed write (disk full, read-only, permissions) stops the run with a message, not a traceback."""
    try:
        yield
    except OSError as e:
        raise TrainingError(f"could not write {what} at step {step}: {describe_os_error(e)}. "
                            f"Training stopped. {last_checkpoint_note(out)}") from e


def write_config(out: Path, cfg: RunConfig, classes: list[str], chosen: tuple[str, dict] | None) -> None:
    """config.toml (atomic: a kill must not leave a cut one; a resume may change steps etc., so it is rewritten),
    with the (precision, matmul FLOP/s) that train.precision = "auto" chose, and classes.json (label -> class
    folder name, for people choosing a class in serve and sample)."""
    text = cfg.to_toml()
    if chosen is not None:
        text += ("\n# what train.precision = \"auto\" runs this run in (matmul FLOP/s measured at its start; "
                 "--resume keeps it)\n"
                 f"{CHOSEN}{json.dumps(chosen[0])}\n{RATES}{json.dumps(chosen[1])}\n")
    atomic_write_text(out / "config.toml", text)
    if classes:
        atomic_write_text(out / "classes.json", json.dumps(classes, indent=1))


def saved_precision(out: Path) -> tuple[str, dict] | None:
    """What a resumed run with train.precision = "auto" keeps: the (precision, rates) its config.toml records
    for "auto", or its explicit train.precision (a run started with "bf16" stays in bf16; rates {}); None
    when it has no config.toml or its record does not read (then "auto" measures again)."""
    path = out / "config.toml"
    try:
        setting = load_config(path).train.precision
        if setting != "auto":
            return setting, {}
        lines = path.read_text().splitlines()
        chosen = next(json.loads(x[len(CHOSEN):]) for x in lines if x.startswith(CHOSEN))
        rates = next((json.loads(x[len(RATES):]) for x in lines if x.startswith(RATES)), {})
    except (OSError, ValueError, StopIteration):
        return None
    if chosen not in ("fp32", "bf16") or not isinstance(rates, dict):
        return None
    return chosen, rates
