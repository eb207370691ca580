"""DDP and FSDP2 on 2 CPU processes (gloo) against one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from patchflow.config import load_config
from patchflow.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")

SETTINGS = ['model.preset="DiT-Micro/4"', "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
            "train.sample_every=0", "train.ema_decay=0.99", "train.num_threads=1"]


def cfg(*extra):
    return load_config("digits", SETTINGS + list(extra))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, parallel, *extra, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}",
           "-m", "patchflow", "train", "digits", "--out", str(out), "--quiet"]
    for s in SETTINGS + [f'train.parallel="{parallel}"', *extra]:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def weights(run, name="model.safetensors"):
    return load_file(str(run / name))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(cfg("train.steps=8", "train.checkpoint_every=4"), out, progress=False)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(single, tmp_path, parallel):
    out = tmp_path / parallel
    torchrun(out, parallel, "train.steps=8", "train.checkpoint_every=4")
    assert losses(out) == pytest.approx(losses(single), rel=1e-4, abs=1e-6)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(single, name), weights(out, name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)


def test_sharded_checkpoint_from_two_processes_resumes_in_one(single, tmp_path):
    out = tmp_path / "resharded"
    torchrun(out, "fsdp", "train.steps=4", "train.checkpoint_every=4")
    train(cfg("train.steps=8", "train.checkpoint_every=4", 'train.parallel="fsdp"'), out, resume=True,
          progress=False)
    assert losses(out) == pytest.approx(losses(single), rel=1e-4, abs=1e-6)
    a, b = weights(single), weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)


def test_tampered_shard_cannot_run_code(tmp_path):
    """DCP unpickles non-tensor values (optimizer hyperparameters); patchflow reads them with weights_only."""
    from pathlib import Path

    from patchflow.train.distributed import load_sharded, save_sharded

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.param_groups[0]["eps"] = Payload()
    save_sharded(Path(tmp_path / "ck"), model, opt)
    fresh = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="refusing to load optim.param_groups.0.eps"):
        load_sharded(Path(tmp_path / "ck"), fresh, torch.optim.AdamW(fresh.parameters()))
    assert not marker.exists()
    meta = tmp_path / "ck" / ".metadata"  # and a metadata file that would run code is refused too
    import pickle
    meta.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system"):
        load_sharded(Path(tmp_path / "ck"), fresh, torch.optim.AdamW(fresh.parameters()))
    assert not marker.exists()
