"""FLOPs in DiT's convention and the measured memory plan."""
import pytest
import torch

from patchflow.cli import main
from patchflow.config import load_config
from patchflow.flops import counted_forward_flops, dit_forward_macs, mfu
from patchflow.models.dit import DiT, DiTConfig
from patchflow.plan import BYTES_PER_PARAM, _saved_bytes, make_plan, parse_memory


@pytest.mark.parametrize("name,gmacs", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.71),
                                        ("DiT-XL/2", 118.64), ("DiT-XL/4", 29.05), ("DiT-XL/8", 7.39)])
def test_forward_macs_match_the_paper_table(name, gmacs):
    cfg = DiTConfig.from_preset(name, input_size=32, in_channels=4, learn_sigma=True)
    assert abs(dit_forward_macs(cfg) / 1e9 - gmacs) < 0.03


@pytest.mark.parametrize("frames,size", [(1, 16), (3, 8)])
def test_analytic_count_equals_pytorch_flop_counter(frames, size):
    cfg = DiTConfig(input_size=16, in_channels=3, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=7)
    model = DiT(cfg)
    x = torch.randn(1, 3, frames, size, size)
    counted = counted_forward_flops(model, x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert counted == 2 * dit_forward_macs(cfg, frames=frames, size=size)


def test_mfu():
    assert mfu(images_per_s=10, forward_macs=5e9, peak_flops=1e12) == pytest.approx(0.3)


def _cfg(*extra):
    return load_config("digits", ['model.preset="DiT-Micro/4"', "model.depth=4", *extra])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_plan_extrapolation_equals_direct_measurement(precision):
    cfg = _cfg(f'train.precision="{precision}"')
    plan = make_plan(cfg)
    model = DiT(cfg.model)
    assert plan.params == sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    direct = _saved_bytes(model, cfg, 3)
    assert plan.activation_bytes(3) == pytest.approx(direct, rel=1e-6)
    model.checkpoint_every = 1
    direct_ckpt = _saved_bytes(model, cfg, 3)
    # in forward a checkpointed model keeps block inputs only; backward rebuilds one block at a time
    assert plan.activation_bytes(3, 1) - plan.block.at(3) == pytest.approx(direct_ckpt, rel=1e-6)
    assert plan.activation_bytes(64, 1) < 0.5 * plan.activation_bytes(64)


def test_largest_batch_is_the_largest_that_fits():
    plan = make_plan(_cfg())
    budget = plan.params * BYTES_PER_PARAM + 200 * 2**20
    for k in (0, 1, 2):
        b = plan.largest_batch(budget, k)
        assert plan.memory(b, k) <= budget < plan.memory(b + 1, k)
    assert plan.largest_batch(budget, 1) > plan.largest_batch(budget, 0)


def test_parse_memory():
    assert parse_memory("80GB") == 80 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5G") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="--memory must look like"):
        parse_memory("lots")


def test_plan_cli(capsys):
    assert main(["plan", "digits", "--set", 'model.preset="DiT-XL/2"', "--set", "model.in_channels=4",
                 "--set", 'train.precision="fp32"', "--memory", "80GB", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "118.62 GMACs" in out and "largest batch in 80.0 GiB" in out
    assert main(["plan", "digits", "--memory", "a lot"]) == 2


def test_plan_of_a_video_preset_counts_its_spacetime_tokens(capsys):
    """The moving-digits VideoDiT: 8 frames x 4x4 patches; the count goes through the model on meta tensors."""
    assert main(["plan", "moving-digits", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "model: VIDEO" in out and "latent 8x8x8x8" in out and "13,825,760" in out
    one_frame = main(["plan", "moving-digits", "--set", "model.frames=1", "--batch", "8"])
    out1 = capsys.readouterr().out
    gmacs = [float(o.split("forward per sample: ")[1].split(" GMACs")[0]) for o in (out, out1)]
    assert one_frame == 0 and 4 < gmacs[0] / gmacs[1] < 6  # 128 + 16 prompt tokens vs 16 + 16, and attention


@pytest.mark.parametrize("bf16, fp32, warned", [(1e9, 100e9, True), (150e9, 100e9, False), (60e9, 100e9, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns_with_the_measured_rates(monkeypatch, bf16, fp32, warned):
    import warnings

    from patchflow import flops

    monkeypatch.setattr(flops, "matmul_peak", lambda dtype, **kw: bf16 if dtype == torch.bfloat16 else fp32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flops.warn_if_bf16_is_slow("cpu", "train.precision")
        flops.warn_if_bf16_is_slow(torch.device("meta"), "train.precision")  # not a CPU: never measured
    messages = [str(w.message) for w in caught]
    assert messages == ([f'train.precision = "bf16", but this CPU runs bf16 matmuls at {bf16 / 1e9:.1f} GFLOP/s '
                         f"against {fp32 / 1e9:.1f} in fp32 (no native bf16: AVX512-BF16 or AMX), so expect it to be "
                         'far slower than fp32: set train.precision = "fp32" (train, demo: --set '
                         "train.precision=fp32; sampling a run: its config.toml)"] if warned else [])


def test_the_matmul_peak_is_measured_once_per_process():
    from patchflow import flops

    flops.matmul_peak.cache_clear()
    first = flops.matmul_peak(torch.float32, n=64, reps=1)
    assert first > 0 and flops.matmul_peak(torch.float32, n=64, reps=1) == first
    assert flops.matmul_peak.cache_info().hits == 1
