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
from patchflow.train.run import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")

SETTINGS = ['model.preset="DiT-Micro/4"', "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
            "train.sample_every=0", "train.ema_decay=0.99", "train.num_threads=1",
            # the earlier preset's recipe, pinned: with the faster one (REPA, shift 3, beta2 0.95, a shorter warmup)
            # the last bits of FSDP's reduction order grow past atol within 8 steps
            'repa.encoder=""', "flow.shift=1.0", "train.betas=[0.9, 0.999]", "train.warmup_steps=100"]


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


def by_t(run):
    return [json.loads(line)["loss_by_t"] for line in (run / "log.jsonl").read_text().splitlines()]


def weights(run, name="model.safetensors"):
    return load_file(str(run / name))


def two_ranks(tmp_path, script, *args, timeout=120):
    """Start 2 processes as torchrun would (RANK, WORLD_SIZE, MASTER_*), but each with its own exit code and
    output, and none killed because another one exited. Returns [(exit code, output)] by rank."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(tmp_path / f"rank{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        log.close()
    try:
        codes = [p.wait(timeout=timeout) for p in procs]  # a rank left waiting fails here instead of hanging
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(code, (tmp_path / f"rank{rank}.txt").read_text()) for rank, code in enumerate(codes)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(cfg("train.steps=8", "train.checkpoint_every=4"), out, progress=False)
    return out


@pytest.fixture(scope="module")
def single_accum(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_accum") / "run"
    train(cfg("train.steps=4", "train.checkpoint_every=4", "train.grad_accum=2"), out, progress=False)
    return out


# bf16 (the digits preset): the single process autocasts fp32 weights, FSDP gathers bf16 weights
# (MixedPrecisionPolicy); both round the same weights for the matmuls, so the same tolerance holds
@pytest.mark.parametrize("parallel, accum", [("ddp", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2)],
                         ids=["ddp", "fsdp", "ddp-accum2", "fsdp-accum2"])
def test_two_processes_match_one_with_the_same_global_batch(single, single_accum, tmp_path, parallel, accum):
    """grad_accum=2 skips the gradient sync on the first micro-batch (no_sync / set_requires_gradient_sync);
    the accumulated result must still be one process's."""
    ref = single if accum == 1 else single_accum
    out = tmp_path / parallel
    torchrun(out, parallel, f"train.steps={8 // accum}", "train.checkpoint_every=4", f"train.grad_accum={accum}")
    assert losses(out) == pytest.approx(losses(ref), rel=1e-4, abs=1e-6)
    # loss_by_t covers both processes' samples: the one-process run's bins, filled the same way
    for got, want in zip(by_t(out), by_t(ref), strict=True):
        assert [v is None for v in got] == [v is None for v in want]
        assert [v for v in got if v is not None] == pytest.approx([v for v in want if v is not None], rel=1e-3)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = weights(ref, name), weights(out, name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("parallel, quantize", [("ddp", "int8"), ("fsdp", "")], ids=["ddp-int8-base", "fsdp"])
def test_a_lora_run_on_two_processes_matches_one(single, tmp_path, parallel, quantize):
    """The frozen base is read by every process (an int8 base is left out of DDP's broadcast; FSDP shards the
    frozen and the trainable parameters alike); the adapters train as in one process."""
    if quantize:
        pytest.importorskip("torchao")
    lora = [f'train.init_from="{single}"', "lora.rank=4", 'lora.targets=["attn.*", "mlp.fc2"]', "train.steps=4",
            "train.checkpoint_every=4", f'lora.quantize_base="{quantize}"']
    ref = tmp_path / "one"
    train(cfg(*lora), ref, progress=False)
    out = tmp_path / parallel
    torchrun(out, parallel, *lora)
    assert losses(out) == pytest.approx(losses(ref), rel=1e-4, abs=1e-6)
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
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


# ---- one 2-process run of small checks on a DiT-Micro (gradient sync, mixed precision, EMA, agreement) ------
PROBE = r"""
import json, os, sys
from pathlib import Path
import torch
from patchflow.config import load_config
from patchflow.pipeline import build_model
from patchflow.train import distributed
from patchflow.train.ema import EMA

torch.set_num_threads(1)
d, device = distributed.init(torch.device("cpu"))
cfg = load_config("digits", ['model.preset="DiT-Micro/4"'])
g = torch.Generator().manual_seed(0)
x, t, y = torch.randn(2, 8, 1, 32, 32, generator=g), torch.rand(2, 8, generator=g) * 1000, torch.randint(10, (2, 8))
mine = slice(4 * d.rank, 4 * d.rank + 4)  # this process's half of each global micro-batch
full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
result = {}


def model():
    torch.manual_seed(0)
    return build_model(cfg.model)


reference = model()  # one process: the 2 global micro-batches, accumulated
for k in range(2):
    reference(x[k], t[k], y[k]).square().mean().div(2).backward()
for parallel in ("ddp", "fsdp"):
    m = distributed.wrap(model(), parallel, d)
    reduces = []
    for k in range(2):  # grad_accum = 2: only the last micro-batch syncs
        with torch.profiler.profile() as prof, distributed.grad_sync(m, sync=k == 1):
            m(x[k][mine], t[k][mine], y[k][mine]).square().mean().div(2).backward()
        reduces.append(sum(e.count for e in prof.key_averages() if e.key.startswith("c10d::") and "reduce" in e.key))
    err = max((full(p.grad) - q.grad).abs().max().item() for p, q in zip(m.parameters(), reference.parameters()))
    result[parallel] = {"reduces": reduces, "grad_err": err}

m = distributed.wrap(model(), "fsdp", d, param_dtype=torch.bfloat16)
gathered = []
m.blocks[0].attn.qkv.register_forward_pre_hook(lambda mod, args: gathered.append(str(mod.weight.dtype)))
ema, opt = EMA(m), torch.optim.AdamW(m.parameters())
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = m(x[0][mine], t[0][mine], y[0][mine]).float().square().mean()
loss.backward()
opt.step()
result["bf16"] = {"gathered": gathered, "sharded": sorted({str(p.dtype) for p in m.parameters()}),
                  "grads": sorted({str(p.grad.dtype) for p in m.parameters()}),
                  "adam": sorted({str(v.dtype) for s in opt.state.values() for k, v in s.items() if k != "step"}),
                  "ema": sorted({str(s.dtype) for s in ema.shadow})}

m = distributed.wrap(model(), "fsdp", d)
sd, ref = EMA(m).state_dict(keep=d.main), model().state_dict()
result["ema"] = None if sd is None else {"keys": sorted(sd) == sorted(ref),
                                         "err": max((sd[k] - ref[k]).abs().max().item() for k in ref)}
result["any_rank"] = [distributed.any_rank(d.rank == 1, d, device), distributed.any_rank(False, d, device)]
Path(sys.argv[1], f"probe{d.rank}.json").write_text(json.dumps(result))
distributed.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as the CLI does: interpreter teardown after the group is gone can abort in gloo's threads
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    for code, output in two_ranks(tmp, PROBE, tmp):
        assert code == 0, output[-3000:]
    return [json.loads((tmp / f"probe{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_accumulation_syncs_gradients_only_on_the_last_micro_batch(probe, parallel):
    for rank in range(2):
        first, last = probe[rank][parallel]["reduces"]
        assert first == 0 and last > 0  # no all-reduce / reduce-scatter until the last micro-batch
        assert probe[rank][parallel]["grad_err"] < 1e-6  # ... which yields one process's accumulated gradient


def test_fsdp_bf16_gathers_bf16_weights_and_keeps_fp32_master_weights(probe):
    for rank in range(2):
        r = probe[rank]["bf16"]
        assert r["gathered"] == ["torch.bfloat16"]  # what forward computes with, and what is all-gathered
        assert r["sharded"] == r["grads"] == r["adam"] == r["ema"] == ["torch.float32"]


def test_fsdp_ema_is_gathered_in_full_on_rank_0_only(probe):
    assert probe[0]["ema"] == {"keys": True, "err": 0.0}  # the full, unsharded initial weights
    assert probe[1]["ema"] is None


def test_ranks_agree_on_a_flag_set_on_one_rank(probe):
    assert probe[0]["any_rank"] == probe[1]["any_rank"] == [True, False]


# ---- failures and SIGTERM on one of 2 processes ------------------------------------------------------------
LAUNCH = r"""
import errno, os, signal, sys
from patchflow.cli import main

rank, fault = int(os.environ["RANK"]), sys.argv[1]
if fault == "shards" and rank == 0:  # this process's part of the DCP checkpoint cannot be written
    from torch.distributed.checkpoint.filesystem import FileSystem
    real_stream = FileSystem.create_stream
    def create_stream(self, path, mode):
        if str(path).endswith(".distcp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_stream(self, path, mode)
    FileSystem.create_stream = create_stream
if fault == "files" and rank == 0:  # the files only the main process writes cannot be written
    import patchflow.run_dir as ckpt
    real_save = ckpt.save_file
    def save_file(tensors, path, **kw):
        if ".tmp-step" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(tensors, path, **kw)
    ckpt.save_file = save_file
if fault == "sigterm" and rank == 1:  # only this process is told to stop, during its third step
    from patchflow.train.trainer import Trainer
    real_step = Trainer.train_step
    def train_step(self, batches):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batches)
    Trainer.train_step = train_step
sys.exit(main(sys.argv[2:]))
"""


def launch_args(out, parallel, *extra):
    args = ["train", "digits", "--out", out, "--quiet"]
    for s in SETTINGS + [f'train.parallel="{parallel}"', "train.peak_tflops=1", *extra]:
        args += ["--set", s]
    return args


@pytest.mark.parametrize("where", ["shards", "files"])
def test_checkpoint_write_failure_on_rank_0_stops_every_rank_with_its_message(tmp_path, where):
    out = tmp_path / "run"
    ranks = two_ranks(tmp_path, LAUNCH, where, *launch_args(out, "fsdp", "train.steps=4", "train.checkpoint_every=2"))
    messages = []
    for code, output in ranks:
        assert code == 2, output[-3000:]
        assert "Traceback" not in output
        messages.append(next(line for line in output.splitlines() if line.startswith("patchflow train: error:")))
    assert messages[0] == messages[1]  # the same message on both processes: rank 0's error, path and errno
    assert "could not write checkpoint step 2" in messages[0] and "No space left on device [ENOSPC]" in messages[0]
    assert "No checkpoint was written yet" in messages[0]
    assert not (out / "checkpoints" / "latest").exists()
    assert not [p.name for p in (out / "checkpoints").iterdir()]  # the partial temp folder is removed


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    args = launch_args(out, "ddp", "train.steps=8", "train.checkpoint_every=5")
    ranks = two_ranks(tmp_path, LAUNCH, "sigterm", *args)
    assert [code for code, _ in ranks] == [75, 75], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    ckpt = out / "checkpoints" / "step_0000003"
    assert f"stopped by SIGTERM after step 3 of 8: checkpoint {ckpt} is written" in ranks[0][1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
