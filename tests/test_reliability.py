"""Reliability of training: kill -9 and exact resume, crash-safe checkpoints, safe loading, NaN steps, full disks,
SIGTERM (preemption).

Every run here is the tiny DiT-Micro/4 setting of test_train_cli.py on one thread; the reference is one
uninterrupted 24-step run, and every interrupted run must end bitwise equal to it.
"""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import patchflow.run_dir as ckpt_mod
from patchflow.cli import main
from patchflow.config import ConfigError, load_config
from patchflow.flow.objective import RectifiedFlowObjective
from patchflow.run_dir import (CheckpointError, checkpoints_to_keep, latest_checkpoint, list_checkpoints,
                                        load_state, load_weights)
from patchflow.train.run import train
from patchflow.train.trainer import PREEMPTED_EXIT_CODE, Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.preset=\"DiT-Micro/4\"", "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
        "train.sample_every=0", "train.ema_decay=0.99", "sample.n=4", "sample.steps=4", 'repa.encoder=""']
RUN = TINY + ["train.checkpoint_every=3", "train.keep_checkpoints=2", "train.num_threads=1"]
STEPS = 24


def sets(*extra):
    return RUN + [f"train.steps={STEPS}"] + list(extra)


def cfg(*extra):
    return load_config("digits", sets(*extra))


def cli_args(out, *extra, resume=False):
    return (["train", "digits", "--out", str(out), "--quiet"] + [a for s in sets(*extra) for a in ("--set", s)]
            + (["--resume"] if resume else []))


def read_log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def assert_same_run(run, ref):
    """Same per-step losses and bitwise the same final raw and EMA weights."""
    assert [(r["step"], r["loss"]) for r in read_log(run)] == [(r["step"], r["loss"]) for r in read_log(ref)]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(Path(run) / name)), load_file(str(Path(ref) / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    train(cfg(), out, progress=False)
    torch.set_num_threads(n)
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))
    return out


# ---- 1. kill -9 at any moment ------------------------------------------------------------------------------
def _launch(out, logfile, resume):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "patchflow"] + cli_args(out, resume=resume), cwd=REPO, env=env,
                            stdout=logfile, stderr=subprocess.STDOUT)


def _lines(path):
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _writing(run):
    return any(p.name.startswith(".tmp-step_") for p in (run / "checkpoints").iterdir())


def _kill_when(proc, ready, delay):
    """SIGKILL `proc` `delay` s after ready() holds; False if it finished first."""
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training subprocess made no progress"
        time.sleep(0.003)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_kill_9_at_random_moments_then_resume_is_bitwise_exact(reference, tmp_path):
    rng = random.Random(20240607)
    out, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    transcript = tmp_path / "stdout.txt"
    with open(transcript, "w") as f:
        # kill 1: as soon as config.toml exists, long before the first checkpoint (step 3)
        assert _kill_when(_launch(out, f, resume=False), (out / "config.toml").is_file, 0.0)
        before_first_checkpoint = latest_checkpoint(out) is None  # all but certain; timing is the OS's
        # kill 2: a random moment, once the log has grown past the stale log's end by a random number of steps
        target = _lines(log) + rng.randint(3, 9)
        assert _kill_when(_launch(out, f, resume=True), lambda: _lines(log) >= target, rng.uniform(0, 0.1))
        # kill 3: inside a checkpoint write (a fresh .tmp-step_N folder exists), past the stale leftovers
        target = _lines(log) + 1
        assert _kill_when(_launch(out, f, resume=True), lambda: _lines(log) >= target and _writing(out),
                          rng.uniform(0, 0.02))
        finish = _launch(out, f, resume=True)
        assert finish.wait(timeout=120) == 0
    said = transcript.read_text()
    assert ("has no checkpoint yet; starting it again from step 0" in said) == before_first_checkpoint
    assert said.count("resumed from") >= 1
    assert_same_run(out, reference)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".del-"))]


def test_resume_without_checkpoint_starts_from_step_0_and_drops_a_cut_log_line(reference, tmp_path):
    out = tmp_path / "run"
    train(cfg("train.steps=2"), out, progress=False)
    shutil.rmtree(out / "checkpoints")  # as if killed at step 2, before the first checkpoint (step 3)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.7')  # a line cut by the kill
    train(cfg("train.steps=4"), out, resume=True, progress=False)
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(reference)[:4]]


def test_cut_log_line_after_a_checkpoint_is_dropped_on_resume(reference, tmp_path):
    out = tmp_path / "run"
    train(cfg("train.steps=5"), out, progress=False)  # checkpoint at 3, log to 5
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.41, "loss_')
    train(cfg("train.steps=7"), out, resume=True, progress=False)
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(reference)[:7]]


def test_resume_of_a_directory_without_a_run_is_an_error(tmp_path, capsys):
    assert main(cli_args(tmp_path / "empty", resume=True)) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "Traceback" not in err


# ---- 2. crash-safe checkpoints and keep policies -----------------------------------------------------------
def test_keep_policy_newest_n_and_every_kth():
    assert checkpoints_to_keep([2, 4, 6, 8, 10, 12], 12, keep=2, keep_every=4) == {4, 8, 10, 12}
    assert checkpoints_to_keep([2, 4, 6], 6, keep=0, keep_every=0) == {2, 4, 6}
    assert checkpoints_to_keep([3, 6, 9], 6, keep=1, keep_every=0) == {6}  # 9: an abandoned continuation
    with pytest.raises(ConfigError, match="train.keep_every"):
        load_config("digits", ["train.keep_every=-1"])


def test_keep_policy_in_a_run(tmp_path):
    out = tmp_path / "run"
    train(load_config("digits", TINY + ["train.steps=12", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                                        "train.keep_every=4", "train.num_threads=1"]), out, progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000004", "step_0000008", "step_0000010", "step_0000012"]
    assert latest_checkpoint(out).name == "step_0000012"


def test_crash_while_writing_a_checkpoint_never_yields_a_half_checkpoint(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save_file = ckpt_mod.save_file

    def crash_after_first_file(tensors, path, **kw):
        if ".tmp-step_0000006" in path and path.endswith("ema.safetensors"):
            raise RuntimeError("simulated crash mid-checkpoint")  # not an OSError: nothing cleans up, like kill -9
        real_save_file(tensors, path, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", crash_after_first_file)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(), out, progress=False)
    monkeypatch.undo()
    root = out / "checkpoints"
    half = root / ".tmp-step_0000006"
    assert (half / "model.safetensors").is_file() and not (half / "state.pt").exists()  # really half-written
    assert (root / "latest").read_text().strip() == "step_0000003"
    assert latest_checkpoint(out) == root / "step_0000003"
    assert [p.name for p in list_checkpoints(out)] == ["step_0000003"]
    # a stale temp folder is never taken as a checkpoint, even a complete-looking newer one
    stale = root / ".tmp-step_0000099"
    stale.mkdir()
    for name in ("model.safetensors", "ema.safetensors", "state.pt"):
        (stale / name).write_bytes((root / "step_0000003" / name).read_bytes())
    assert latest_checkpoint(out) == root / "step_0000003"
    (root / "latest").unlink()  # without the pointer too
    assert latest_checkpoint(out) == root / "step_0000003"

    train(cfg(), out, resume=True, progress=False)
    assert not half.exists() and not stale.exists()  # removed by the next save
    assert_same_run(out, reference)


# ---- 3. safe loading ---------------------------------------------------------------------------------------
class RunsCode:
    """A pickle payload: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_pickle_in_a_checkpoint_is_refused_and_never_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(out, "train.steps=3")) == 0
    ckpt = latest_checkpoint(out)
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "payload": RunsCode(marker)}, ckpt / "state.pt")
    assert main(cli_args(out, "train.steps=6", resume=True)) == 2
    err = capsys.readouterr().err
    assert str(ckpt / "state.pt") in err and "refusing to load" in err and "Traceback" not in err
    assert "weights_only" not in err  # torch's advice to turn it off is not passed on
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing"):
        load_state(ckpt / "state.pt")
    assert not marker.exists()
    # the payload is real: a plain unpickling would have run it
    torch.load(ckpt / "state.pt", weights_only=False)
    assert marker.is_dir()


def test_pickle_where_safetensors_weights_are_expected_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(out, "train.steps=3")) == 0
    ckpt = latest_checkpoint(out)
    marker = tmp_path / "pwned"
    torch.save({"w": RunsCode(marker)}, ckpt / "model.safetensors")  # a pickle under the safetensors name
    assert main(cli_args(out, "train.steps=6", resume=True)) == 2
    err = capsys.readouterr().err
    assert str(ckpt / "model.safetensors") in err and "not a valid safetensors file" in err
    torch.save({"w": RunsCode(marker)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="only from .safetensors"):
        load_weights(tmp_path / "model.pt")
    assert not marker.exists()


# ---- 4. numerical faults -----------------------------------------------------------------------------------
def test_a_nan_step_is_skipped_and_training_goes_on(reference, tmp_path):
    trainer = Trainer(cfg("train.steps=8"), tmp_path / "run", progress=False)
    real_loss = trainer.objective.loss

    def nan_at_step_5(*args, **kw):
        loss = real_loss(*args, **kw)
        return loss * float("nan") if trainer.step == 4 else loss  # trainer.step counts finished steps

    trainer.objective.loss = nan_at_step_5
    with pytest.warns(RuntimeWarning, match="step 5: non-finite loss"):
        trainer.fit()
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 9))  # the step counter advanced through the bad step
    assert log[4]["skipped"] is True and log[4]["loss"] is None
    assert [r["bad_steps"] for r in log] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not any(r.get("skipped") for r in log[:4] + log[5:])
    assert [r["loss"] for r in log[:4]] == [r["loss"] for r in read_log(reference)[:4]]
    assert trainer.ema.updates == 7
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / name)).values())


def test_consecutive_nan_steps_stop_the_run_naming_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    calls = []
    real_loss = RectifiedFlowObjective.loss

    def nan_from_step_6(self, *args, **kw):
        calls.append(1)
        loss = real_loss(self, *args, **kw)
        return loss * float("nan") if len(calls) >= 6 else loss

    monkeypatch.setattr(RectifiedFlowObjective, "loss", nan_from_step_6)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning):
        assert main(cli_args(out, "train.max_bad_steps=3")) == 2
    err = capsys.readouterr().err
    assert "training stopped at step 8: 3 steps in a row (6..8)" in err and "Traceback" not in err
    assert str(out / "checkpoints" / "step_0000006") in err and "--resume" in err
    log = read_log(out)
    assert log[-1]["step"] == 8 and log[-1]["bad_steps"] == 3 and log[-1]["skipped"] is True
    assert latest_checkpoint(out).name == "step_0000006"
    with pytest.raises(ConfigError, match="train.max_bad_steps"):
        load_config("digits", ["train.max_bad_steps=0"])


# ---- 5. disk full / unwritable output ----------------------------------------------------------------------
def test_disk_full_while_checkpointing_stops_cleanly_and_resumes_exactly(reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save_file = ckpt_mod.save_file

    def disk_full_at_step_6(tensors, path, **kw):
        if ".tmp-step_0000006" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, path, **kw)

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full_at_step_6)
    assert main(cli_args(out)) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step_0000003"
    assert "No space left on device [ENOSPC]" in err and "checkpoint step 6" in err and "Traceback" not in err
    assert f"last good checkpoint {good} (step 3) is intact" in err and "--resume" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert load_state(good / "state.pt")["step"] == 3 and load_weights(good / "ema.safetensors")
    assert main(cli_args(out, resume=True)) == 0
    assert_same_run(out, reference)


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_output_directory_fails_before_training(tmp_path, capsys, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    out = blocker / "run" if where == "under_a_file" else blocker
    t0 = time.perf_counter()
    assert main(cli_args(out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the run directory {out}" in err and "Traceback" not in err
    assert ("[ENOTDIR]" if where == "under_a_file" else "[EEXIST]") in err
    assert time.perf_counter() - t0 < 10  # before the data set and the model are built


# ---- 6. preemption: SIGTERM ----------------------------------------------------------------------------------
def test_sigterm_checkpoints_the_current_step_exits_75_and_resume_is_bitwise_exact(reference, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    transcript = tmp_path / "stdout.txt"
    workers = "data.num_workers=1"  # a DataLoader worker gets the signal too, as under SLURM
    with open(transcript, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "patchflow"] + cli_args(out, workers), cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        deadline = time.monotonic() + 120
        while _lines(log) < 4:  # some progress, past the first regular checkpoint (step 3)
            assert proc.poll() is None and time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.003)
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as SLURM and `kill -TERM -PGID` do
        assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE == 75
    stopped = read_log(out)[-1]["step"]
    ckpt = out / "checkpoints" / f"step_{stopped:07d}"
    assert 4 <= stopped < STEPS and latest_checkpoint(out) == ckpt and load_state(ckpt / "state.pt")["step"] == stopped
    said = transcript.read_text()
    assert f"stopped by SIGTERM after step {stopped} of {STEPS}: checkpoint {ckpt} is written" in said
    assert "--resume" in said and "Traceback" not in said
    assert main(cli_args(out, workers, resume=True)) == 0
    assert f"resumed from {ckpt} at step {stopped}" in capsys.readouterr().out
    assert_same_run(out, reference)
