"""Shared by the end-to-end run tests (text-to-image, text-to-video): the CLI in-process, a run's log, and the
kill -9 / resume check."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from patchflow.cli import main
from patchflow.run_dir import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


def cli(args, capsys):
    """(exit code, stdout + stderr) of `patchflow ARGS` run in this process."""
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def _launch(config: Path, out: Path, logfile, resume: bool, cache: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PATCHFLOW_CACHE=str(cache))
    args = ["train", str(config), "--out", str(out), "--quiet"] + (["--resume"] if resume else [])
    return subprocess.Popen([sys.executable, "-m", "patchflow", *args], cwd=REPO, env=env, stdout=logfile,
                            stderr=subprocess.STDOUT)


def kill_9_then_resume(cfg, tmp_path: Path, reference: Path, start_timeout: float = 120,
                       resume_timeout: float = 180) -> None:
    """Train `cfg` (a RunConfig checkpointing at step 4) in a subprocess, kill -9 it past its first checkpoint,
    resume it, and assert its log (steps and losses) and final weights equal the uninterrupted `reference` run's
    bit for bit."""
    out, log, cache = tmp_path / "run", tmp_path / "run" / "log.jsonl", tmp_path / "cache"
    config = tmp_path / "run.toml"
    config.write_text(cfg.to_toml())
    with open(tmp_path / "stdout.txt", "w") as f:
        proc = _launch(config, out, f, resume=False, cache=cache)
        deadline = time.monotonic() + start_timeout
        while not (log.is_file() and log.read_bytes().count(b"\n") >= 6):  # past the first checkpoint (step 4)
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stdout.txt").read_text()
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        assert latest_checkpoint(out) is not None
        assert _launch(config, out, f, resume=True, cache=cache).wait(timeout=resume_timeout) == 0
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(reference)]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
