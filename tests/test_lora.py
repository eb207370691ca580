"""LoRA: adapters on the chosen layers of every model kind, step-0 equality, merges (exact, stacked), and real
(tiny) runs: only the adapters train and are saved, exact resume after kill -9, sampling and merging a LoRA run,
and the refusals of bad input (exit 2)."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from patchflow.config import ConfigError, load_config
from patchflow.lora.adapters import add_adapters, merge, split_adapter
from patchflow.lora.config import LoRAConfig
from patchflow.models import build_model
from patchflow.models.dit import DiTConfig
from patchflow.models.text_config import MMDiTConfig, VideoDiTConfig
from patchflow.run_dir import latest_checkpoint, load_state
from patchflow.train.run import train
from run_helpers import cli, read_log
from text_model_inputs import randomize

TEXT = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=3, num_heads=2, text_dim=12,
            pooled_dim=10)
MODELS = {"dit": DiTConfig(preset="DiT-Micro/4", depth=3, input_size=8, in_channels=4),
          "mmdit": MMDiTConfig(**TEXT), "crossdit": MMDiTConfig(arch="crossdit", **TEXT),
          "video": VideoDiTConfig(frames=3, **TEXT)}


def model_inputs(arch: str):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 8, 8, generator=g) if arch == "video" else torch.randn(2, 4, 8, 8, generator=g)
    t = torch.rand(2, generator=g) * 1000
    if arch == "dit":
        return (x, t), {"y": torch.tensor([1, 2])}
    return (x, t), {"text": torch.randn(2, 5, 12, generator=g), "pooled": torch.randn(2, 10, generator=g)}


def adapted(arch: str, **lora):
    model = randomize(build_model(MODELS[arch])).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = add_adapters(model, LoRAConfig(rank=4, **lora))
    return model, base, names


@pytest.mark.parametrize("arch", list(MODELS))
def test_step_0_equals_the_base_and_only_adapters_train(arch):
    model, base, names = adapted(arch)
    plain = randomize(build_model(MODELS[arch])).eval()
    args, cond = model_inputs(arch)
    with torch.no_grad():
        assert torch.equal(model(*args, **cond), plain(*args, **cond))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{half}.weight" for n in names for half in ("down", "up")}
    assert names and all(".attn." in n for n in names)
    assert split_adapter(model.state_dict())[0].keys() == base.keys()  # the base keeps its names


def test_patterns_and_blocks_choose_the_layers():
    _, _, names = adapted("mmdit", targets=["attn.text_*"], blocks=[0, 2])
    # the last joint block has no text output projection (SD3's context_pre_only)
    assert names == ["blocks.0.attn.text_qkv", "blocks.0.attn.text_proj", "blocks.2.attn.text_qkv"]
    _, _, names = adapted("dit", targets=["mlp.fc1", "x_embedder.proj"])
    assert names == ["x_embedder.proj"] + [f"blocks.{i}.mlp.fc1" for i in range(3)]


@pytest.mark.parametrize("lora, message", [
    (dict(targets=["attn.to_q"]), "'attn.to_q' matches no Linear layer"),
    (dict(blocks=[7]), "lora.blocks [7] are beyond the model's blocks 0..2"),
    (dict(targets=["x_embedder.proj"], blocks=[1]), "matches no Linear layer in blocks [1]"),
])
def test_a_pattern_or_block_that_chooses_nothing_is_an_error(lora, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        adapted("dit", **lora)


def random_adapter(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in split_adapter(model.state_dict())[1].items()}


@pytest.mark.parametrize("arch", list(MODELS))
def test_merge_equals_the_adapter_applied_at_run_time(arch):
    model, base, _ = adapted(arch, alpha=2.0)
    weights = random_adapter(model, 0)
    model.load_state_dict(weights, strict=False)
    plain = build_model(MODELS[arch]).eval()
    plain.load_state_dict(merge(base, [(weights, 0.5)]))  # alpha / rank
    args, cond = model_inputs(arch)
    with torch.no_grad():
        a, b = model(*args, **cond), plain(*args, **cond)
    assert not torch.equal(a, plain.__class__(MODELS[arch]).eval()(*args, **cond))
    # float32 rounding of the merged weights, through activations as large as the randomised DiT's (~100)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_stacked_adapters_add_their_deltas():
    model, base, names = adapted("dit")
    a, b = random_adapter(model, 1), random_adapter(model, 2)
    both = merge(base, [(a, 0.7), (b, -1.5)])
    for n in names:
        want = base[n + ".weight"] + 0.7 * a[n + ".lora_up.weight"] @ a[n + ".lora_down.weight"] \
            - 1.5 * b[n + ".lora_up.weight"] @ b[n + ".lora_down.weight"]
        torch.testing.assert_close(both[n + ".weight"], want, rtol=1e-6, atol=1e-6)
    untouched = set(base) - {n + ".weight" for n in names}
    assert all(torch.equal(both[k], base[k]) for k in untouched)


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=-1"], "lora.rank must be >= 1"),
    (["lora.rank=4"], "lora.rank adapts a trained base model: set train.init_from"),
    (["lora.rank=4", "train.init_from=\"x\"", "lora.dropout=1.0"], "lora.dropout must be in [0, 1)"),
    (["lora.rank=4", "train.init_from=\"x\"", "lora.targets=[]"], "lora.targets is empty"),
])
def test_bad_lora_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config("digits", overrides)


# ---- runs ----------------------------------------------------------------------------------------------------
# the preset's REPA off: its projector would train beside the adapters
TINY = ["model.preset=\"DiT-Micro/4\"", "model.depth=2", "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
        "train.sample_every=0", "train.ema_decay=0.99", "sample.n=4", "sample.steps=4", "train.num_threads=1",
        "train.checkpoint_every=4", "train.keep_checkpoints=2", "repa.encoder=\"\""]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "base"
    train(load_config("digits", TINY + ["train.steps=3"]), out, progress=False)
    return out


def lora_cfg(base, *extra, steps=8):
    return load_config("digits", TINY + [f"train.steps={steps}", f"train.init_from=\"{base}\"", "lora.rank=4",
                                         "lora.alpha=8", "lora.targets=[\"attn.*\", \"mlp.fc2\"]",
                                         "train.sample_every=4", *extra])


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapted"
    train(lora_cfg(base_run), out, progress=False)
    return out


def test_a_lora_run_trains_and_saves_only_its_adapters(base_run, lora_run):
    base = load_file(str(base_run / "ema.safetensors"))
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(str(lora_run / name))
        assert weights and all(".lora_" in k for k in weights), name
        assert len(weights) == 2 * 2 * 3  # 2 blocks x (qkv, proj, fc2) x (down, up)
        assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in weights.items())
    state = load_state(latest_checkpoint(lora_run) / "state.pt")
    assert len(state["optimizer"]["state"]) == 12  # AdamW holds moments of the adapters alone
    assert load_config(lora_run / "config.toml").lora.base_hash  # recorded
    assert (lora_run / "samples" / "step_0000008.png").is_file()  # previews merge the EMA adapters into the base
    assert load_file(str(base_run / "ema.safetensors")).keys() == base.keys()
    assert len(read_log(lora_run)) == 8


def test_sampling_a_lora_run_merges_its_adapter_into_its_base(base_run, lora_run, tmp_path, capsys):
    import patchflow

    model = patchflow.load(lora_run)
    base = load_file(str(base_run / "ema.safetensors"))
    adapter = load_file(str(lora_run / "ema.safetensors"))
    want = merge(base, [(adapter, 2.0)])
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    code, said = cli(["lora", "export", str(lora_run), "--out", str(tmp_path / "a.safetensors")], capsys)
    assert code == 0, said
    # the base plus the exported adapter at half strength = the base plus half the delta
    stacked = patchflow.load(base_run, loras=[f"{tmp_path / 'a.safetensors'}:0.5"])
    half = merge(base, [(adapter, 1.0)])
    assert all(torch.allclose(stacked.state_dict()[k], half[k], atol=1e-6) for k in half)
    code, said = cli(["lora", "merge", str(lora_run), f"{tmp_path / 'a.safetensors'}:-1", "--out",
                      str(tmp_path / "merged")], capsys)
    assert code == 0, said  # its own adapter in, then out again: the base
    merged = patchflow.load(tmp_path / "merged")
    assert all(torch.allclose(merged.state_dict()[k], base[k], atol=1e-6) for k in base)
    assert load_config(tmp_path / "merged" / "config.toml").lora.rank == 0
    code, said = cli(["sample", str(lora_run), "--label", "3", "--n", "2", "--steps", "2", "--out",
                      str(tmp_path / "s.png"), "--lora", str(tmp_path / "a.safetensors")], capsys)
    assert code == 0 and (tmp_path / "s.png").is_file(), said


def test_resume_of_a_lora_run_is_bitwise_exact(base_run, lora_run, tmp_path):
    # in process: what a kill -9 adds (a cut log, a half-written checkpoint) is the trainer's, tested in
    # test_reliability.py for every run; here, that a LoRA run restores its adapters, optimizer and base
    out = tmp_path / "run"
    train(lora_cfg(base_run, steps=4), out, progress=False)
    train(lora_cfg(base_run), out, resume=True, progress=False)
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in read_log(lora_run)]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(lora_run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_changed_base_and_bad_adapter_files_are_refused(base_run, lora_run, tmp_path, capsys):
    import shutil

    moved = tmp_path / "base"
    shutil.copytree(base_run, moved)
    run = tmp_path / "adapted"
    shutil.copytree(lora_run, run)
    text = (run / "config.toml").read_text().replace(str(base_run), str(moved))
    (run / "config.toml").write_text(text)
    weights = load_file(str(moved / "ema.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(moved / "ema.safetensors"))
    out = str(tmp_path / "s.png")
    code, said = cli(["sample", str(run), "--label", "1", "--out", out], capsys)
    assert code == 2 and "changed since the adapter was trained" in said, said
    code, said = cli(["train", str(run / "config.toml"), "--out", str(run), "--resume", "--quiet"], capsys)
    assert code == 2 and "changed since the adapter was trained" in said, said
    # an adapter for another base, a pickle, a corrupt file, a file of no known format
    code, said = cli(["sample", str(moved), "--label", "1", "--out", out, "--lora", str(lora_run)], capsys)
    assert code == 2 and "trained on another base" in said, said
    torch.save({"a": torch.zeros(2)}, tmp_path / "a.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for path, message in ((tmp_path / "a.pt", "never loaded"), (tmp_path / "bad.safetensors", "not a valid"),
                          (tmp_path / "other.safetensors", "not a patchflow adapter")):
        code, said = cli(["sample", str(base_run), "--label", "1", "--out", out, "--lora", str(path)], capsys)
        assert code == 2 and message in said, said
    assert not (tmp_path / "s.png").exists()


def test_a_dit_run_exports_kohya_files_that_read_back(base_run, lora_run, tmp_path, capsys):
    import patchflow
    from safetensors import safe_open

    code, said = cli(["lora", "export", str(lora_run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")],
                     capsys)
    assert code == 0, said
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_blocks_1_attn_qkv.lora_down.weight" in keys  # official DiT's names
    assert {k for k in keys if k.endswith(".alpha")} == {k.replace("lora_down.weight", "alpha") for k in keys
                                                          if k.endswith("lora_down.weight")}
    want = patchflow.load(lora_run).state_dict()
    got = patchflow.load(base_run, loras=[str(tmp_path / "k.safetensors")]).state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    code, said = cli(["lora", "export", str(lora_run), "--format", "diffusers", "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and "--format diffusers holds SD3" in said, said


def test_an_int8_base_trains_like_the_float_base_and_resumes_exactly(base_run, lora_run, tmp_path):
    pytest.importorskip("torchao")
    from patchflow.lora.adapters import add_adapters
    from patchflow.lora.quantize import quantize_base, weight_bytes

    int8 = "lora.quantize_base=\"int8\""
    train(lora_cfg(base_run, int8, steps=4), tmp_path / "q", progress=False)
    train(lora_cfg(base_run, int8), tmp_path / "q", resume=True, progress=False)
    got, want = read_log(tmp_path / "q"), read_log(lora_run)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) < 1e-3  # int8 rounding of the base only
    assert got != want
    weights = load_file(str(tmp_path / "q" / "ema.safetensors"))
    assert weights.keys() == load_file(str(lora_run / "ema.safetensors")).keys()  # adapters only, float
    model = build_model(load_config(lora_run / "config.toml").model)
    add_adapters(model, load_config(lora_run / "config.toml").lora)
    before = weight_bytes(model)
    frozen = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n]
    assert quantize_base(model) == len(frozen) == 15  # every frozen Linear; the adapters stay float
    assert all(type(m.lora_up.weight) is torch.nn.Parameter for m in model.modules() if hasattr(m, "lora_up"))
    assert weight_bytes(model) < 0.5 * before


def test_merging_an_adapter_into_its_full_base_run_bakes_it_into_ema_and_raw_weights(base_run, lora_run, tmp_path,
                                                                                      capsys):
    adapter = tmp_path / "a.safetensors"
    assert cli(["lora", "export", str(lora_run), "--out", str(adapter)], capsys)[0] == 0
    # the adapter records the hash of the base's EMA file; the raw weights are merged under the same check
    code, said = cli(["lora", "merge", str(base_run), f"{adapter}:0.5", "--out", str(tmp_path / "m")], capsys)
    assert code == 0, said
    delta = load_file(str(lora_run / "ema.safetensors"))
    for name in ("ema.safetensors", "model.safetensors"):
        want = merge(load_file(str(base_run / name)), [(delta, 1.0)])  # alpha 8 / rank 4 x 0.5
        got = load_file(str(tmp_path / "m" / name))
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want), name
