"""The run's own records: loss by timestep bin in log.jsonl and the TensorBoard copy of the log."""
import json

import pytest
import torch

from patchflow.config import load_config
from patchflow.report import TIMESTEP_BINS
from patchflow.train.run_log import TimestepBins, model_times
from patchflow.train.run import train

TINY = ["model.preset=\"DiT-Micro/4\"", "train.batch_size=16", "train.lr=1e-3", "train.log_every=5",
        "train.sample_every=10", "train.checkpoint_every=10", "train.ema_decay=0.99", "sample.n=4", "sample.steps=2",
        'repa.encoder=""']


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_timestep_bins_average_each_bin_and_start_afresh():
    bins = TimestepBins(4)
    bins.add(torch.tensor([0.0, 0.1, 0.3, 1.0, 0.99]), torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]))
    assert bins.pop() == [2.0, 5.0, None, 8.0]  # t = 1 falls in the last bin
    bins.add(torch.tensor([0.6]), torch.tensor([4.0]))
    assert bins.pop() == [None, None, 4.0, None]
    other = TimestepBins(4)  # another process's window, summed in by `reduce` (an all-reduce in training)
    other.add(torch.tensor([0.6, 0.05]), torch.tensor([8.0, 2.0]))
    bins.add(torch.tensor([0.7]), torch.tensor([3.0]))
    assert bins.pop(lambda both: both + torch.stack([other.sum, other.count])) == [2.0, None, 5.5, None]


def test_model_times_take_the_noisy_frames_of_a_clip():
    x = torch.zeros(2, 4, 3, 8, 8)
    assert torch.equal(model_times((x, torch.tensor([250.0, 1000.0])), 1000.0), torch.tensor([0.25, 1.0]))
    per_frame = torch.tensor([[0.0, 500.0, 500.0], [0.0, 0.0, 100.0]])  # given frames sit at t = 0
    assert torch.equal(model_times((x, per_frame), 1000.0), torch.tensor([0.5, 0.1]))
    assert model_times((x, torch.zeros(2, 8)), None) is None  # a codec: no timestep
    assert model_times((x,), 1000.0) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    train(load_config("digits", TINY + ["train.steps=20"]), out, progress=False)
    train(load_config("digits", TINY + ["train.steps=30"]), out, resume=True, progress=False)
    return out


def test_log_holds_the_loss_by_timestep(run):
    log = read_log(run)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    for r in log:
        bins = r["loss_by_t"]
        assert len(bins) == TIMESTEP_BINS
        seen = [b for b in bins if b is not None]
        assert len(seen) >= 5  # 80 logit-normal timesteps a window reach most bins
        # the window's mean loss is a mixture of its bins' means
        assert min(seen) - 1e-6 <= r["loss_avg"] <= max(seen) + 1e-6


def test_tensorboard_mirrors_the_log_without_duplicated_steps(run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    log = {r["step"]: r for r in read_log(run)}
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == sorted(log)  # the resume purged nothing it did not write again
    assert all(e.value == pytest.approx(log[e.step]["loss"], rel=1e-6) for e in losses)
    assert [e.step for e in events.Scalars("train/mfu")] == sorted(log)
    first_bin = [t for t in events.Tags()["scalars"] if t.startswith("loss_by_t/0.0-")]
    assert first_bin or all(r["loss_by_t"][0] is None for r in log.values())
    assert [e.step for e in events.Images("samples")] == [10, 20, 30]
