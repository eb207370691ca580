"""Configuration and command-line validation under random input (hypothesis) and named bad examples.

The contract: a configuration or command line is either accepted, or rejected before any work starts
with a `ConfigError` (config) / exit code 2 and a one-line message (CLI) that names the key or flag.
Nothing here trains or samples: the functions that would start work are replaced by recorders.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchflow.cli as cli
import patchflow.convert.dit
import patchflow.evaluate.digits
import patchflow.pipeline
import patchflow.train.run
from patchflow.config import MAX_SAMPLES, PRESET_DIR, SECTIONS, ConfigError, RunConfig, from_dict, load_config
from patchflow.models.dit import DiT

PRESET = tomllib.loads((PRESET_DIR / "digits.toml").read_text())
FIELDS = {name: {f.name: f.type for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
# 150 examples per test keeps the file at seconds; PATCHFLOW_FUZZ_EXAMPLES=5000 hunts deeper
# the default run is derandomized so CI is repeatable; setting PATCHFLOW_FUZZ_EXAMPLES explores fresh inputs
FUZZ = settings(max_examples=int(os.environ.get("PATCHFLOW_FUZZ_EXAMPLES", 150)), deadline=None,
                derandomize="PATCHFLOW_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ value strategies

NAMES = st.text(max_size=10)
INTS = st.one_of(st.integers(-3, 70), st.integers(),
                 st.sampled_from([2**31, 2**63 - 1, 2**63, -2**63 - 1, 10**30, 10**400]))
FLOATS = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 2.5, 0.5]))
WORDS = st.sampled_from(["DiT-Q/2", "DiT-S/2", "DiT-Mini/8", "DiT-Micro/4", "DiT-XL/2", "DiT-Mini/0", "DiT-Mini/4/2",
                         "euler", "heun", "ddpm", "ddim", "rectified", "uniform", "mode", "bf16", "fp32", "digits",
                         "cpu", ""])
DATES = st.one_of(st.dates(), st.times(), st.datetimes())  # TOML has dates and times too
SCALARS = st.one_of(st.booleans(), INTS, FLOATS, st.text(max_size=20), WORDS, DATES)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(NAMES, inner, max_size=3)), max_leaves=8)


def plausible(annotation):
    """Values near the valid range of a field's type, so that many random configs pass validation."""
    if annotation == "int":
        return st.integers(-2, 600)
    if annotation == "float":
        return st.one_of(st.floats(-2, 1100, allow_nan=False), st.sampled_from([0.0, 0.5, 1.0, 4.0]))
    if annotation == "bool":
        return st.booleans()
    if annotation == "str":
        return WORDS
    return st.lists(st.floats(-0.5, 1.5, allow_nan=False), max_size=3)


@st.composite
def config_edit(draw):
    """(section, key, value); key None replaces the whole section."""
    section = draw(st.one_of(st.sampled_from(sorted(SECTIONS)), NAMES))
    if draw(st.integers(0, 9)) == 0:
        return section, None, draw(VALUES)
    fields = FIELDS.get(section, {})
    if fields and draw(st.integers(0, 4)):
        key = draw(st.sampled_from(sorted(fields)))
        return section, key, draw(st.one_of(plausible(fields[key]), VALUES))
    return section, draw(NAMES), draw(VALUES)


def build_on_meta(cfg: RunConfig) -> None:
    with torch.device("meta"):
        DiT(cfg.model)


# ------------------------------------------------------------------------------------------ from_dict

@FUZZ
@given(st.lists(config_edit(), min_size=1, max_size=4))
def test_random_config_edits_are_accepted_or_rejected_by_name(edits):
    data = copy.deepcopy(PRESET)
    names = set()
    for section, key, value in edits:
        if key is None:
            data[section] = value
            names |= {f"[{section}]", f"[{section!r}]"}  # an odd name is shown quoted
        else:
            if not isinstance(data.get(section), dict):
                data[section] = {}
            data[section][key] = value
            names |= {f"{section}.{key}", f"{section}.{key!r}"} if section in SECTIONS else \
                {f"[{section}]", f"[{section!r}]"}
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        msg = str(e)
        assert any(name in msg for name in names), f"{msg!r} names none of {names}"
        assert "\n" not in msg and len(msg) < 1000
        return
    build_on_meta(cfg)  # an accepted config builds: the validator caught every impossible shape
    assert from_dict(tomllib.loads(cfg.to_toml())) == cfg  # and what a run directory stores reads back


# ------------------------------------------------------------------------------------------ --set

KNOWN_PATHS = [f"{s}.{k}" for s, fields in FIELDS.items() for k in fields]
ODD_PATHS = ["a", "a.b.c", ".x", "train.", ".", "", "train..steps", " train.steps ", "TRAIN.steps", "model.preset.x",
             "train.steps ", "train. steps", "[train].steps", "train.steps\n"]
RAW = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["nan", "inf", "-inf", "+nan", "1e999", "0", "-5", "[0.9]", "[1, 2", "{a = 1}", "{", '"unterminated',
                     "'x'", "true", "True", "1979-05-27", "07:32:00", "1_000", "0x10", "9" * 5000, "[" * 3000,
                     "1\nx = 2", '"DiT-Q/2"', "DiT-S/2", "2.5", '"""', "[[1], [2]]", "{preset = 'DiT-S/2'}", "", " ",
                     "=", "1 # comment", "[0.9, 0.999]", "[0.0, 1.0]", "'euler'", "ddim"]),
    INTS.map(str), FLOATS.map(str))
SET_ITEMS = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(KNOWN_PATHS), st.sampled_from(ODD_PATHS), NAMES), RAW),
    st.text(max_size=15))


@FUZZ
@given(st.lists(SET_ITEMS, min_size=1, max_size=4))
def test_random_set_overrides_raise_only_config_errors(items):
    try:
        cfg = load_config("digits", items)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 1000
        return
    build_on_meta(cfg)


# ------------------------------------------------------------------------------------------ command line

class WorkStarted(BaseException):
    """Raised by the recorders that replace training, model loading, scoring and checkpoint reading."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    run = root / "run"
    run.mkdir()
    (run / "config.toml").write_text(load_config("digits").to_toml())  # no weights: loading is never reached
    np.savez(root / "real.npz", images=np.zeros((4, 32, 32, 1), np.uint8), labels=np.arange(4))
    (root / "garbage.npz").write_bytes(b"not a zip file")
    (root / "dir.npz").mkdir()
    (root / "binary.toml").write_bytes(b"\xff\xfe\x00")
    (root / "deep.toml").write_text("v = " + "[" * 3000)
    return root


@pytest.fixture
def work(monkeypatch, files):
    """Replace every function that would start real work with a recorder; returns the list of calls."""
    calls = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise WorkStarted(name)
        return record

    monkeypatch.setattr(patchflow.train.run, "train", recorder("train"))
    monkeypatch.setattr(patchflow.pipeline.Pipeline, "load", recorder("Pipeline.load"))
    monkeypatch.setattr(patchflow.evaluate.digits, "evaluate_samples", recorder("evaluate_samples"))
    monkeypatch.setattr(patchflow.convert.dit, "load_official_state_dict", recorder("convert"))
    monkeypatch.setattr(patchflow.convert.dit, "load_diffusers_dit", recorder("convert"))
    monkeypatch.chdir(files)
    return calls


def run_cli(argv, capsys, calls):
    """(code, stderr): code is 0, 2 or 'work' (validation passed and work would have started)."""
    calls.clear()
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: 2 for a usage error, 0 for --help
        code = e.code
    except WorkStarted:
        code = "work"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 2, "work"), code
    if code == 2:
        assert not calls, f"work started although the command was rejected: {calls}"
        first = err.lstrip().splitlines()[0] if err.strip() else ""
        assert first.startswith(("patchflow", "usage:")), err
        if first.startswith("patchflow"):
            assert len(err.strip().splitlines()) == 1 and len(err) < 1000, err
    if code == "work":
        assert calls
    return code, err


INT_TEXT = st.one_of(st.integers(-5, 1200).map(str), st.integers().map(str),
                     st.sampled_from(["nan", "inf", "2.5", "", "abc", "0x10", "1_0", " 5", "-0", "9" * 5000,
                                      "10000000000000000000000", "99", "100001", "1000001"]))
FLOAT_TEXT = st.one_of(INT_TEXT, st.floats().map(str),
                       st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "-1", "1000", "100.0000001", "4"]))
OUT_TEXT = st.sampled_from(["x.png", "x.npz", "x.jpg", "x", ".png", "x.PNG", "x.npz.tmp", "sub/x.npz", "x.png/",
                            "a\nb.npz", "", "-x.png", "x" * 300 + ".npz"])
DEVICES = ["auto", "cpu", "cpu:0", "cuda", "cuda:0", "cuda:7", "mps", "meta", "foo", "", "cuda:-1"]
SAMPLING_FLAGS = {"--steps": INT_TEXT, "--guidance": FLOAT_TEXT, "--seed": INT_TEXT,
                  "--sampler": st.sampled_from(["euler", "heun", "ddpm", "ddim", "rk4", "", "EULER"]),
                  "--device": st.sampled_from(DEVICES), "--no-ema": None, "--quiet": None}
SAMPLE_FLAGS = {**SAMPLING_FLAGS, "--label": INT_TEXT, "--n": INT_TEXT, "--labels-all": INT_TEXT, "--out": OUT_TEXT}
EVAL_FLAGS = {**SAMPLING_FLAGS, "--per-class": INT_TEXT, "--json": OUT_TEXT}
UNKNOWN_FLAGS = st.sampled_from(["--stepz", "--label=3", "-x", "--", "--steps=", "--n=-1", "--guidance=nan", "--help",
                                 "--labels", "--lab", "-"])


@st.composite
def flags(draw, table, base=()):
    """Random flags, most often after a valid `base` (a later flag overrides an earlier one)."""
    argv = list(base) if draw(st.integers(0, 3)) else []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 9)) == 0:
            argv.append(draw(UNKNOWN_FLAGS))
            continue
        flag = draw(st.sampled_from(sorted(table)))
        argv += [flag] if table[flag] is None else [flag, draw(table[flag])]
    return argv


def parse(argv):
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        return None


CUDA = torch.cuda.is_available()
MAX = MAX_SAMPLES


def sampling_problems(ns, objective: str | None) -> list[str]:
    """The flags that the CLI must reject, by an independent reading of the documented ranges."""
    bad = []
    if ns.steps is not None and not 1 <= ns.steps <= 1000:
        bad.append("--steps")
    if ns.guidance is not None and not (math.isfinite(ns.guidance) and 0 <= ns.guidance <= 100):
        bad.append("--guidance")
    if not 0 <= ns.seed < 2**63:
        bad.append("--seed")
    if ns.sampler is not None and ns.sampler not in (("euler", "heun") if objective == "rectified"
                                                     else ("euler", "heun", "ddpm", "ddim")):
        bad.append("--sampler")
    if ns.device not in ("auto", "cpu", "cpu:0") and not (CUDA and ns.device in ("cuda", "cuda:0")):
        bad.append("--device")
    return bad


@FUZZ
@given(st.data())
def test_random_sample_command_lines(files, work, capsys, data):
    run = data.draw(st.sampled_from(["run", "run", "run", "missing", "real.npz"]))
    argv = ["sample", run] + data.draw(flags(SAMPLE_FLAGS, ["--label", "3", "--out", "x.npz"]))
    ns = parse(argv)
    code, err = run_cli(argv, capsys, work)
    if ns is None or code == 0:
        assert code in (0, 2)
        return
    bad = sampling_problems(ns, "rectified")
    if not 1 <= ns.n <= MAX:
        bad.append("--n")
    if ns.labels_all is not None and not 1 <= ns.labels_all * 10 <= MAX:
        bad.append("--labels-all")
    if Path(ns.out).suffix not in (".png", ".npz"):  # ".png" alone is a hidden file with no suffix
        bad.append("--out")
    if run != "run":
        bad.append("run directory")
    if ns.labels_all is None and (ns.label is None or not 0 <= ns.label < 10):
        bad.append("--label")
    if bad:
        assert code == 2 and any(b in err for b in bad), (bad, err)
    else:
        assert code == "work" and work == ["Pipeline.load"], err


@FUZZ
@given(st.data())
def test_random_eval_command_lines(files, work, capsys, data):
    source = data.draw(st.sampled_from(["run", "missing", "real.npz", "garbage.npz", "dir.npz", "missing.npz"]))
    argv = ["eval", source] + data.draw(flags(EVAL_FLAGS))
    ns = parse(argv)
    code, err = run_cli(argv, capsys, work)
    if ns is None or code == 0:
        assert code in (0, 2)
        return
    bad = sampling_problems(ns, "rectified" if source == "run" else None)
    if not 1 <= ns.per_class * (10 if source == "run" else 1) <= MAX:
        bad.append("--per-class")
    if source not in ("run", "real.npz"):
        bad.append(source)
    if bad:
        assert code == 2 and any(b in err for b in bad), (bad, err)
    else:
        assert code == "work" and work == (["Pipeline.load"] if source == "run" else ["evaluate_samples"]), err


CONFIGS = st.sampled_from(["digits", "configs/digits.toml", "nope.toml", "", ".", "run", "run/config.toml",
                           "garbage.npz", "x" * 5000, "a\0b", "../digits"])
TRAIN_FLAGS = {"--set": SET_ITEMS, "--out": OUT_TEXT, "--resume": None, "--quiet": None}


def config_rejected(path, items) -> bool:
    try:
        load_config(path, items)
    except ConfigError:
        return True
    return False


@FUZZ
@given(st.data())
def test_random_train_and_demo_command_lines(files, work, capsys, data):
    command = data.draw(st.sampled_from(["train", "demo"]))
    head = ["train", data.draw(CONFIGS)] if command == "train" else ["demo"]
    argv = head + data.draw(flags(TRAIN_FLAGS))
    ns = parse(argv)
    code, err = run_cli(argv, capsys, work)
    if ns is None or code == 0:
        assert code in (0, 2)
        return
    if config_rejected(ns.config if command == "train" else "digits", ns.set):
        assert code == 2, err
    else:
        assert code == "work" and work == ["train"], err


@FUZZ
@given(st.data())
def test_random_convert_command_lines(files, work, capsys, data):
    kind = data.draw(st.sampled_from(["dit-official", "diffusers-dit", "dit", ""]))
    out = data.draw(st.sampled_from(["new", "run", "real.npz", "sub/new"]))
    argv = ["convert", kind, data.draw(st.sampled_from(["missing.pt", "garbage.npz", "run", ""])), out]
    argv += data.draw(flags({"--num-heads": INT_TEXT}))
    ns = parse(argv)
    code, err = run_cli(argv, capsys, work)
    if ns is None or code == 0:
        assert code in (0, 2)
        return
    # --num-heads is for official checkpoints only (diffusers configs name their heads)
    bad = ["--num-heads"] if ns.num_heads is not None and (ns.num_heads < 1 or ns.kind != "dit-official") else []
    if out in ("run", "real.npz"):
        bad.append(out)
    if bad:
        assert code == 2 and any(b in err for b in bad), (bad, err)
    else:
        assert code == "work" and work == ["convert"], err


# ------------------------------------------------------------------------------------------ named rejections

@pytest.mark.parametrize("overrides,message", [
    (["model.patch_size=3"], "model.patch_size=3 does not divide model.input_size=32"),
    (["model.num_heads=3", "model.hidden_size=256"], "model.num_heads=3 does not divide model.hidden_size=256"),
    (["model.hidden_size=30", "model.num_heads=2"], "model.hidden_size=30 must be divisible by 4"),
    (["sample.guidance=-1"], "sample.guidance must be in [0, 100]"),
    (["sample.guidance=1000"], "sample.guidance must be in [0, 100]"),
    (["sample.steps=0"], "sample.steps must be in 1..1000"),
    (["sample.steps=100000"], "sample.steps must be in 1..1000"),
    (["sample.guidance=nan"], "sample.guidance must be a finite number, got nan"),
    (["sample.guidance=inf"], "sample.guidance must be a finite number, got inf"),
    (["train.lr=inf"], "train.lr must be a finite number, got inf"),
    (["train.weight_decay=nan"], "train.weight_decay must be a finite number, got nan"),
    (["train.betas=[0.9]"], "train.betas must be two numbers in [0, 1)"),
    (["train.betas=0.9"], "train.betas must be a list"),
    (["train.betas=[0.9, nan]"], "train.betas[1] must be a finite number"),
    (["nope.x=1"], "unknown section 'nope'"),
    (["train.steps=\"many\""], "train.steps must be of type int, got 'many' (str)"),
    (["train.steps=2.5"], "train.steps must be of type int, got 2.5 (float)"),
    (["train.lr=[1]"], "train.lr must be of type float, got [1] (list)"),
    (["model.depth=true"], "model.depth must be of type int, got True (bool)"),
    (["sample.n=true"], "sample.n must be of type int, got True (bool)"),
    (["model.learn_sigma=1"], "model.learn_sigma must be of type bool, got 1 (int)"),
    (["train.steps=9223372036854775808"], "train.steps must be an integer in [-2**63, 2**63)"),
    (["train.lr=" + "9" * 400], "train.lr must be an integer in [-2**63, 2**63)"),  # float(10**400) overflows
    (["model.preset=\"DiT-Q/2\""], "unknown DiT preset 'DiT-Q/2'; known: DiT-XL/{2,4,8}"),
    (["model.preset=5"], "model.preset must be of type str, got 5 (int)"),
    (["model.preset=\"DiT-Mini/0\""], "unknown DiT preset 'DiT-Mini/0'"),  # not: model.patch_size must be >= 1
    (["model.preset=\"DiT-Mini/ 4\""], "unknown DiT preset 'DiT-Mini/ 4'"),
    (["flow.objective=\"x\""], "flow.objective = 'x' is not allowed; choose one of: 'rectified', 'ddpm'"),
    (["flow.objective=\"ddpm\""], "sample.sampler = 'euler' is not allowed with flow.objective = 'ddpm'"),
    (["flow.objective=\"ddpm\"", "sample.sampler=\"ddpm\"", "flow.num_timesteps=10"],
     "flow.num_timesteps must be in 21..100000 for flow.objective = 'ddpm'"),  # linear betas would pass 1
    (["model.mlp_ratio=0"], "model.mlp_ratio must be in (0, 64]"),
    (["model.mlp_norm_eps=0"], "model.mlp_norm_eps must be > 0"),
    (["model.time_freq_shift=128"], "model.time_freq_shift must be in [0, 128)"),
    (["model.depth=100000"], "model.depth must be <= 1024, got 100000"),
    (["model.hidden_size=4611686018427387904"], "model.hidden_size must be <= 16384"),
    (["sample.n=100000000"], "sample.n must be in 1..1000000"),
    (["train.steps=1\nx = 2"], "train.steps must be of type int"),  # no TOML injection through --set
    (["train.steps=" + "[" * 3000], "--set train.steps: the value is nested too deeply"),
])
def test_bad_config_is_rejected_by_name(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("digits", overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_unknown_key_lists_the_accepted_keys(section):
    with pytest.raises(ConfigError) as e:
        from_dict({**PRESET, section: {**PRESET.get(section, {}), "bogus": 1}})
    assert f"unknown key {section}.bogus; [{section}] accepts: {', '.join(sorted(FIELDS[section]))}" in str(e.value)


@pytest.mark.parametrize("data,message", [
    ({"nope": {}}, "unknown section [nope]; sections are: model, flow, data, train, sample"),
    ({"model": 5}, "[model] must be a table of keys, got 5"),
    ({"train": [1, 2]}, "[train] must be a table of keys, got [1, 2]"),
    ({"sample": {"guidance": [10**5000]}}, "sample.guidance must be of type float, got <list> (list)"),
    ({"model": {"preset": ["DiT-S/2"]}}, "model.preset must be of type str"),
    ({"train": {"seed": datetime.date(2024, 1, 1)}}, "train.seed must be of type int"),
])
def test_bad_tables_are_rejected_by_name(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize("path,message", [
    ("", "config file '' not found (shipped presets: codec-color-digits, codec-digits, codec-moving-digits, "
         "color-digits, digits, digits-ddpm, digits-latent, moving-digits, moving-digits-image)"),
    (".", "config file '.' not found"),
    ("/", "config file '/' not found"),
    ("run", "config file 'run' not found"),  # a directory
    ("a\0b", "config file 'a\\x00b' not found"),
    pytest.param("x" * 5000, "xxx... not found (shipped presets: codec-color-digits, codec-digits", id="too-long"),  # shown shortened
    ("../digits", "config file '../digits' not found"),  # only ./NAME and configs/NAME mean a shipped preset
    ("garbage.npz", "garbage.npz: not valid TOML"),
    ("binary.toml", "binary.toml: not valid TOML: 'utf-8' codec can't decode"),
    ("deep.toml", "deep.toml: not valid TOML: maximum recursion depth exceeded"),
])
def test_odd_config_paths_are_rejected_by_name(files, monkeypatch, path, message):
    monkeypatch.chdir(files)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)


@pytest.mark.parametrize("path", ["digits", "digits.toml", "./digits", "configs/digits", "configs/digits.toml"])
def test_shipped_preset_names_still_resolve(path):
    assert load_config(path) == load_config(PRESET_DIR / "digits.toml")


def test_a_set_into_a_section_that_is_not_a_table(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = 5\n")
    with pytest.raises(ConfigError, match=r"\[model\] must be a table"):
        load_config(bad, ["model.depth=2"])


@pytest.mark.parametrize("argv,message", [
    (["sample", "run", "--label", "1", "--guidance", "nan", "--out", "x.npz"], "--guidance must be a finite number in [0, 100]"),
    (["sample", "run", "--label", "1", "--guidance", "101", "--out", "x.npz"], "--guidance must be a finite number in [0, 100]"),
    (["sample", "run", "--label", "1", "--steps", "-5", "--out", "x.npz"], "--steps must be in 1..1000, got -5"),
    (["sample", "run", "--label", "99", "--out", "x.npz"], "--label 99 is out of range: this model has classes 0..9"),
    (["sample", "run", "--label", "1", "--n", "0", "--out", "x.npz"], "--n must be in 1..1000000, got 0"),
    (["sample", "run", "--labels-all", "0", "--out", "x.npz"], "--labels-all must be in 1..1000000, got 0"),
    (["sample", "run", "--labels-all", "200000", "--out", "x.npz"], "--labels-all 200000 asks for 2000000 samples"),
    (["sample", "run", "--label", "1", "--seed", "-1", "--out", "x.npz"], "--seed must be in 0..2**63-1, got -1"),
    (["sample", "run", "--label", "1", "--out", "x.jpg"], "--out must end in .png (a grid) or .npz (arrays)"),
    (["sample", "run", "--label", "1", "--sampler", "ddim", "--out", "x.npz"],
     "--sampler 'ddim' is not allowed for a rectified run; choose one of: 'euler', 'heun'"),
    (["sample", "run", "--label", "1", "--sampler", "rk4", "--out", "x.npz"], "--sampler 'rk4' is not a sampler"),
    (["sample", "run", "--label", "1", "--device", "foo", "--out", "x.npz"], "--device must be auto, cpu, cuda or cuda:N"),
    (["sample", "missing", "--label", "1", "--out", "x.npz"], "is not a patchflow run directory"),
    (["eval", "run", "--per-class", "0"], "--per-class must be in 1..1000000, got 0"),
    (["eval", "garbage.npz"], "garbage.npz: not a readable .npz file"),
    (["eval", "dir.npz"], "dir.npz: not a readable .npz file"),
    (["train", "digits", "--set", "sample.guidance=nan"], "sample.guidance must be a finite number, got nan"),
    pytest.param(["train", "x" * 5000], "xxx... not found", id="train-too-long"),
    (["demo", "--set", "train.betas=[0.9]"], "train.betas must be two numbers in [0, 1)"),
    (["convert", "dit-official", "missing.pt", "new", "--num-heads", "0"], "--num-heads must be >= 1, got 0"),
    (["convert", "dit-official", "missing.pt", "run"], "already holds a run"),
])
def test_bad_command_line_is_rejected_before_work(work, capsys, argv, message):
    code, err = run_cli(argv, capsys, work)
    assert code == 2 and message in err, err


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_rejected(work, capsys):
    code, err = run_cli(["sample", "run", "--label", "1", "--device", "cuda", "--out", "x.npz"], capsys, work)
    assert code == 2 and "--device cuda: this machine has no CUDA device" in err
