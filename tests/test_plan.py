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


# ---- precision = "auto": bf16 autocast where it measured faster than fp32 on this device -------------------------
def _measured(monkeypatch, bf16, fp32):
    from patchflow import flops

    monkeypatch.setattr(flops, "matmul_peak", lambda dtype, **kw: bf16 if dtype == torch.bfloat16 else fp32)


@pytest.mark.parametrize("bf16, fp32, chosen", [(250e9, 100e9, "bf16"), (120e9, 100e9, "bf16"),
                                                (110e9, 100e9, "fp32"), (1e9, 100e9, "fp32")])
def test_auto_takes_bf16_on_a_cpu_only_where_it_measured_faster(monkeypatch, bf16, fp32, chosen):
    from patchflow import flops

    _measured(monkeypatch, bf16, fp32)
    assert flops.choose_precision("cpu") == (chosen, {"bf16": bf16, "fp32": fp32})
    assert flops.resolve_precision("auto", "cpu") == chosen
    assert flops.resolve_precision("fp32", "cpu") == "fp32" and flops.resolve_precision("bf16", "cpu") == "bf16"
    assert flops.choose_precision(torch.device("meta")) == ("fp32", {})  # neither a CPU nor a GPU: fp32


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_gpu_takes_bf16_where_it_is_supported(monkeypatch, supported):
    from patchflow import flops

    _measured(monkeypatch, 0.0, 1.0)  # a GPU is not measured: the CPU's figures must not matter
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert flops.choose_precision("cuda") == ("bf16" if supported else "fp32", {})


AUTO_RUN = ['model.preset="DiT-Micro/4"', "train.batch_size=8", "train.sample_every=0", "train.log_every=1",
            "train.checkpoint_every=1", "train.num_threads=1", 'train.precision="auto"']


def _log(run):
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_auto_precision_is_recorded_and_a_resume_keeps_it(monkeypatch, tmp_path):
    import json

    from patchflow.train import rundir
    from patchflow.train.run import train
    from patchflow.train.trainer import Trainer

    run = tmp_path / "run"
    _measured(monkeypatch, 250e9, 100e9)
    train(load_config("digits", AUTO_RUN + ["train.steps=2"]), run, progress=False)
    rates = {"bf16": 250e9, "fp32": 100e9}
    log = _log(run)
    assert log[0]["precision"] == "bf16" and log[0]["precision_rates"] == rates
    assert "precision" not in log[1]  # on the first record each start writes
    text = (run / "config.toml").read_text()
    assert f'# precision_chosen = "bf16"\n# precision_rates = {json.dumps(rates)}\n' in text
    assert load_config(run / "config.toml").train.precision == "auto"  # the config itself keeps "auto"
    assert rundir.saved_precision(run) == ("bf16", rates)

    _measured(monkeypatch, 1e9, 100e9)  # the machine now measures bf16 as slow: the run keeps its numerics
    resumed = Trainer(load_config("digits", AUTO_RUN + ["train.steps=3"]), run, resume=True, progress=False)
    assert resumed.precision == "bf16" and resumed.step == 2
    resumed.fit()
    assert _log(run)[-1]["step"] == 3 and _log(run)[-1]["precision"] == "bf16"
    assert rundir.saved_precision(run) == ("bf16", rates)

    fresh = Trainer(load_config("digits", AUTO_RUN + ["train.steps=3"]), tmp_path / "fresh", progress=False)
    assert fresh.precision == "fp32" and fresh.chosen == ("fp32", {"bf16": 1e9, "fp32": 100e9})


def test_an_explicit_precision_keeps_its_meaning_and_is_kept_by_an_auto_resume(monkeypatch, tmp_path):
    from patchflow.train import rundir
    from patchflow.train.run import train
    from patchflow.train.trainer import Trainer

    _measured(monkeypatch, 250e9, 100e9)
    run = tmp_path / "run"
    explicit = [s for s in AUTO_RUN if "precision" not in s] + ['train.precision="fp32"']
    train(load_config("digits", explicit + ["train.steps=1"]), run, progress=False)
    assert "precision" not in _log(run)[0] and "precision_chosen" not in (run / "config.toml").read_text()
    assert rundir.saved_precision(run) == ("fp32", {})
    resumed = Trainer(load_config("digits", AUTO_RUN + ["train.steps=2"]), run, resume=True, progress=False)
    assert resumed.precision == "fp32"  # a run started in fp32 stays in fp32 under "auto"


@pytest.mark.parametrize("bf16, fp32", [(250e9, 100e9), (1e9, 100e9)])
def test_sampling_with_auto_runs_in_bf16_where_it_measured_faster(monkeypatch, bf16, fp32):
    from patchflow.pipeline import generate

    _measured(monkeypatch, bf16, fp32)
    cfg = load_config("digits", ['model.preset="DiT-Micro/4"', 'sample.precision="auto"'])
    model = DiT(cfg.model).eval()
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    generate(model, cfg, [1, 2], steps=1, seed=0)
    assert seen and all(s == (bf16 > fp32) for s in seen)
