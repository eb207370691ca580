import json
import math

import pytest
import torch

from patchflow.train.optim import adamw, lr_factor


def _train(opt_factory, steps: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = opt_factory(model.parameters())
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(data).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_adamw_uses_the_fused_kernel_and_matches_the_reference_loop():
    opt = adamw(torch.nn.Linear(3, 3).parameters(), lr=1e-3)
    assert opt.defaults["fused"] is True
    fused = _train(lambda p: adamw(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1))
    loop = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False))
    untrained = _train(lambda p: torch.optim.AdamW(p, lr=0.0))
    for a, b, start in zip(fused.parameters(), loop.parameters(), untrained.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (a - start).abs().max() > 1e-3  # the steps moved the weights


def test_adamw_falls_back_to_foreach_where_no_fused_kernel_exists():
    params = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    opt = adamw(params, lr=1e-3)
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True


def test_lr_factor_warms_up_then_follows_the_schedule():
    warm = [lr_factor(s, 10, warmup_steps=4) for s in range(10)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # constant after the warmup
    cosine = [lr_factor(s, 6, warmup_steps=2, schedule="cosine") for s in range(6)]
    assert cosine == pytest.approx([0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)),
                                    0.0])
    linear = [lr_factor(s, 8, schedule="linear", decay_steps=4, final=0.2) for s in range(8)]
    assert linear == pytest.approx([1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])  # warmup-stable-decay, ends at lr_final
    too_long = [lr_factor(s, 5, warmup_steps=1, schedule="linear", decay_steps=100) for s in range(5)]
    assert too_long == pytest.approx([1, 0.75, 0.5, 0.25, 0])  # a decay longer than the run starts after the warmup


@pytest.mark.parametrize("bad, says", [('train.lr_schedule="step"', "'constant', 'cosine', 'linear'"),
                                       ("train.lr_final=2", "a fraction of train.lr"),
                                       ("train.lr_decay_steps=-1", "train.lr_decay_steps must be >= 0")])
def test_bad_lr_schedule_settings_are_clear_errors(bad, says):
    from patchflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=says):
        load_config("digits", [bad])


def test_the_trainer_logs_the_scheduled_lr(tmp_path):
    from patchflow.config import load_config
    from patchflow.train.run import train

    cfg = load_config("digits", ['model.preset="DiT-Micro/4"', "train.batch_size=4", "train.steps=6", "train.lr=0.01",
                                 "train.warmup_steps=2", 'train.lr_schedule="linear"', "train.lr_final=0.1",
                                 "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=6"])
    train(cfg, tmp_path / "run", progress=False)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # the log line of step k shows the LR after step k's update, the one step k + 1 uses
    assert logged == pytest.approx([0.01 * lr_factor(s, 6, 2, "linear", 0, 0.1) for s in range(1, 7)])
