"""The Trainer is the loop: after its constructor a train_step runs on its own (fit only adds the loader, the logs
and the checkpoints), and it trains a codec preset only through patchflow.train.run."""
import torch

from patchflow.config import load_config
from patchflow.data import ResumableBatchSampler
from patchflow.train.trainer import Trainer

TINY = ['model.preset="DiT-Micro/4"', "train.batch_size=8", "train.lr=1e-3", "train.sample_every=0",
        "train.num_threads=1", 'train.precision="fp32"', 'repa.encoder=""']


def test_a_train_step_runs_without_fit(tmp_path):
    trainer = Trainer(load_config("digits", TINY), tmp_path / "run", progress=False)
    sampler = ResumableBatchSampler(len(trainer.dataset), trainer.cfg.train.batch_size, seed=0)
    batches = iter(torch.utils.data.DataLoader(trainer.dataset, batch_sampler=sampler))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    loss, grad_norm, finite = trainer.train_step(batches)
    assert trainer.step == 1 and finite and loss > 0 and grad_norm > 0
    after = trainer.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.meter.items == 8  # counted for the next log record without fit
    assert not (tmp_path / "run" / "log.jsonl").exists()  # the log is fit's
