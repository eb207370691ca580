"""Few-step students (`patchflow distill`): the distillation math (the student's grid inside the teacher's, the
step that lands where the teacher did), per-sample guidance, the [distill] checks, and real (tiny) runs of both
methods for a class and a text teacher: exact resume across a progressive round, the teacher's hash, a
deterministic sampler at the trained steps, a warning at other steps, and the CLI's refusals (exit 2)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from patchflow.config import ConfigError, load_config
from patchflow.distill.config import DistillConfig
from patchflow.distill.objective import DistillObjective, TeacherStep, ddim_path, ddim_span, ddim_target, euler_path
from patchflow.distill.objective import span_times, step_velocity
from patchflow.flow.ddpm import GaussianDiffusion
from patchflow.flow.config import FlowConfig
from patchflow.flow.guidance import classifier_free
from patchflow.flow.samplers import flow_timesteps
from patchflow.pipeline import Pipeline, to_uint8
from patchflow.run_dir import load_run_config, load_weights
from patchflow.serve.runs import ServedRun
from patchflow.train.distill import Teacher, student_config
from patchflow.train.run import train
from run_helpers import cli, kill_9_then_resume, read_log

TINY = ["model.preset=\"DiT-Micro/4\"", "model.depth=2", "train.batch_size=16", "train.lr=1e-3", "train.log_every=1",
        "train.sample_every=0", "sample.steps=8", "train.num_threads=1", "train.checkpoint_every=3", 'repa.encoder=""']
STUDENT = ["train.batch_size=4", "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=0",
           "train.num_threads=1", "train.log_every=1"]


# ---- the math -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,substeps,shift", [(4, 5, 1.0), (1, 20, 3.0), (2, 2, 2.5)])
def test_span_times_lie_on_the_students_grid(steps, substeps, shift):
    index = torch.arange(steps)
    times = span_times(steps, substeps, shift, index).double()
    student = flow_timesteps(steps, shift)
    assert times.shape == (steps, substeps + 1)
    torch.testing.assert_close(times[:, 0], student[:-1], atol=1e-6, rtol=0)
    torch.testing.assert_close(times[:, -1], student[1:], atol=1e-6, rtol=0)
    assert bool((times.diff(dim=1) < 0).all())  # from noise (1) towards data (0)


def test_euler_path_and_the_step_that_lands_there():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    times = torch.tensor([[1.0, 0.8, 0.5], [0.5, 0.4, 0.25], [0.25, 0.1, 0.0]])
    landed = euler_path(lambda x_, t: v, x, times)  # a constant field: Euler is exact
    torch.testing.assert_close(landed, x + (times[:, -1] - times[:, 0]).reshape(-1, 1, 1, 1) * v)
    torch.testing.assert_close(step_velocity(x, landed, times[:, 0], times[:, -1]), v)
    # a field that depends on x: K small steps differ from one big step, and the fitted velocity makes up for it
    field = lambda x_, t: -x_  # noqa: E731
    landed = euler_path(field, x, times)
    fitted = step_velocity(x, landed, times[:, 0], times[:, -1])
    one = x + (times[:, -1] - times[:, 0]).reshape(-1, 1, 1, 1) * fitted
    torch.testing.assert_close(one, landed)
    assert not torch.allclose(fitted, field(x, None))


def test_distill_loss_is_zero_for_a_student_that_matches_its_teacher():
    """A teacher with a constant field: the target is that field; a student predicting it has loss 0, one off by 1
    everywhere has loss 1 per sample."""
    objective = DistillObjective(FlowConfig())
    x0 = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    v = torch.full_like(x0[:1], 0.3)
    teacher = TeacherStep(lambda x, t: v.expand_as(x), steps=4, substeps=3)
    seen = []

    def student(offset):
        def fn(x, t):
            seen.append(t)
            return v.expand_as(x) + offset
        return fn

    loss = objective.loss(student(0.0), x0, torch.Generator().manual_seed(2), teacher=teacher)
    assert loss.shape == (5,) and float(loss.abs().max()) < 1e-10
    torch.testing.assert_close(objective.loss(student(1.0), x0, torch.Generator().manual_seed(2), teacher=teacher),
                               torch.ones(5))
    grid = flow_timesteps(4, 1.0).float() * 1000  # the student is asked at its own grid times only
    assert all(min(abs(float(t) - float(g)) for g in grid[:-1]) < 1e-3 for t in seen[0])
    with pytest.raises(ValueError, match="needs its teacher"):
        objective.loss(student(0.0), x0)


def test_guidance_per_sample_interval():
    """Times inside the guidance interval are guided, times outside take the conditional branch, in one batch."""
    model = lambda x, t, y: x * (1 + y.float()[:, None, None, None]) + t[:, None, None, None] / 1000  # noqa: E731
    x, t = torch.ones(2, 1, 2, 2), torch.tensor([900.0, 100.0])
    cond, null = torch.tensor([2, 2]), torch.tensor([0, 0])
    out = classifier_free(model, cond, null, 3.0, interval=(0.5, 1.0))(x, t)
    c, u = model(x, t, cond), model(x, t, null)
    torch.testing.assert_close(out[0], (u + 3.0 * (c - u))[0])
    torch.testing.assert_close(out[1], c[1])


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddim_target_lands_where_the_teacher_did(prediction):
    """One DDIM step with the target output goes from x at t to the teacher's landing point at t_next."""
    diffusion = GaussianDiffusion.linear(1000, prediction=prediction)
    g = torch.Generator().manual_seed(4)
    x, landed = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t, t_next = torch.tensor([999, 500, 40]), torch.tensor([700, 260, -1])
    out = ddim_target(diffusion, x, landed, t, t_next)
    stepped = ddim_path(lambda x_, s: out, diffusion, x, torch.stack([t, t_next], 1))
    torch.testing.assert_close(stepped, landed, atol=2e-4, rtol=1e-4)


def test_ddim_span_is_the_respaced_sampler_grid():
    """The student's DDIM sampler at N respaced steps walks exactly the span's ends; substeps lie between."""
    spans = ddim_span(1000, 4, 3, torch.arange(4))
    keep = GaussianDiffusion.linear(1000).respace(4).timestep_map
    assert spans[:, 0].tolist() == sorted(keep.tolist(), reverse=True) and spans[-1, -1] == -1
    assert spans[:, -1].tolist() == sorted(keep.tolist(), reverse=True)[1:] + [-1]
    assert bool((spans.diff(dim=1) <= 0).all()) and spans.shape == (4, 4)


# ---- the [distill] checks -------------------------------------------------------------------------------------
def test_rounds_and_substeps():
    d = DistillConfig(teacher="t", steps=4)
    assert d.substeps(20) == 5 and d.substeps(28) == 7 and DistillConfig(steps=1).substeps(20) == 20
    assert d.rounds(20) == 3 and d.rounds(28) == 3 and d.rounds(8) == 1 and d.rounds(4) == 1 and d.rounds(33) == 4


@pytest.mark.parametrize("overrides,message", [
    (["distill.method=\"reflux\""], "distill.method = 'reflux' is not allowed"),
    (["distill.steps=0"], "distill.steps must be in 1..64"),
    (["distill.guidance=-3"], "distill.guidance must be in"),
    (["train.init_from=\"\""], "a student starts from its teacher's weights"),
    (["flow.objective=\"ddpm\"", "sample.sampler=\"ddim\"", "distill.method=\"progressive\""],
     "use distill.method = \"trajectory\" with distill.steps >= 2"),
    (["flow.objective=\"ddpm\"", "sample.sampler=\"ddim\"", "distill.steps=1"], "keep timestep 0 alone"),
    (["distill.method=\"progressive\"", "lora.rank=4"], "use distill.method = \"trajectory\""),
])
def test_bad_distill_settings(overrides, message):
    base = ["distill.teacher=\"runs/t\"", "train.init_from=\"runs/t\""]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config("digits", base + overrides)


# ---- runs -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    train(load_config("digits", TINY + ["train.steps=3"]), out, progress=False)
    return out


def distilled(teacher, out, method, *extra, steps=2):
    cfg = student_config(teacher, steps, method, STUDENT + list(extra))
    train(cfg, out, progress=False)
    return cfg


@pytest.mark.parametrize("method", ["trajectory", "progressive"])
def test_student_run_and_exact_resume(teacher, tmp_path, method):
    """A 6-step student; the same run stopped after its step-4 checkpoint (past the progressive round boundary at
    step 3, whose teacher is the student's EMA then) and resumed ends bit for bit equal."""
    full = tmp_path / "full"
    cfg = distilled(teacher, full, method)
    saved = load_run_config(full)
    assert (saved.sample.steps, saved.sample.guidance, saved.distill.steps) == (2, 1.0, 2)
    assert saved.distill.method == method and len(saved.distill.teacher_hash) == 64
    assert saved.train.init_from == str(teacher) and cfg.distill.guidance == -1.0
    if method == "progressive":
        assert (full / "checkpoints/step_0000004/teacher.safetensors").is_file()  # round 1's teacher
        assert not (full / "checkpoints/step_0000002/teacher.safetensors").exists()
    log = read_log(full)
    assert [r["step"] for r in log] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in log)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints/step_0000006")
    (cut / "checkpoints/latest").write_text("step_0000004")
    train(student_config(teacher, 2, method, STUDENT), cut, resume=True, progress=False)
    a, b = load_weights(full / "ema.safetensors"), load_weights(cut / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = ("step", "loss", "grad_norm", "lr", "loss_by_t")
    assert [[r[k] for k in same] for r in read_log(cut)] == [[r[k] for k in same] for r in log]


def test_kill_9_then_resume_of_a_progressive_student(teacher, tmp_path):
    """kill -9 past the step-4 checkpoint of an 8-step, 2-round student (its round boundary at step 4), then
    --resume: the log and weights equal the uninterrupted run's bit for bit."""
    extra = ["train.steps=8", "train.checkpoint_every=4", "train.precision=\"fp32\""]
    reference = tmp_path / "reference"
    distilled(teacher, reference, "progressive", *extra)
    kill_9_then_resume(student_config(teacher, 2, "progressive", STUDENT + extra), tmp_path, reference)


def test_progressive_teacher_is_the_student_of_the_round_before(teacher, tmp_path):
    cfg = student_config(teacher, 2, "progressive", STUDENT)
    t = Teacher(cfg, torch.device("cpu"), resume=False)
    assert (t.rounds, t.substeps, t.round_steps) == (2, 2, 3)  # 8 teacher steps -> 4 -> 2
    assert [t.stage(s) for s in range(6)] == [(0, 4)] * 3 + [(1, 2)] * 3
    x, t_ = torch.randn(2, 1, 32, 32), torch.tensor([900.0, 300.0])
    cond, null = {"y": torch.tensor([3, 5])}, {"y": torch.tensor([10, 10])}
    c, u = t.model(x, t_, **cond), t.model(x, t_, **null)
    with torch.no_grad():  # round 0: the teacher run, guided at its sample.guidance (3)
        torch.testing.assert_close(t.at(2, None, cond, null).fn(x, t_), u + 3.0 * (c - u))

    class StudentEMA:  # the student's EMA at step 3: the first round's student
        def state_dict(self, keep=True):
            return {k: v + 0.01 for k, v in t.model.state_dict().items()}

    step = t.at(3, StudentEMA(), cond, null)
    assert t.round == 1 and (step.steps, step.substeps) == (2, 2)
    with torch.no_grad():  # ... whose guidance is folded in: no second guidance on top
        torch.testing.assert_close(step.fn(x, t_), t.model(x, t_, **cond))
    assert not torch.allclose(t.model(x, t_, **cond), c)
    trajectory = Teacher(student_config(teacher, 2, "trajectory", STUDENT), torch.device("cpu"), resume=False)
    assert (trajectory.rounds, trajectory.substeps, trajectory.stage(5)) == (1, 4, (0, 2))


def test_a_changed_teacher_is_refused_on_resume(teacher, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    out = tmp_path / "student"
    distilled(copy, out, "trajectory", "train.steps=2")
    weights = load_weights(copy / "ema.safetensors")
    from safetensors.torch import save_file
    save_file({k: v + 0.01 for k, v in weights.items()}, copy / "ema.safetensors")
    with pytest.raises(ConfigError, match="changed since the student was distilled from it"):
        train(student_config(copy, 2, "trajectory", STUDENT + ["train.steps=4"]), out, resume=True, progress=False)


def test_student_samples_deterministically_and_warns_off_its_steps(teacher, tmp_path):
    out = tmp_path / "student"
    distilled(teacher, out, "trajectory", "train.steps=2")
    pipe = Pipeline.load(out, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at the trained steps
        a, b = pipe([3, 5], seed=0), pipe([3, 5], seed=0)
    assert a.shape == (2, 32, 32, 1) and np.array_equal(a, b)
    assert not np.array_equal(a, pipe([3, 5], seed=1))
    with pytest.warns(UserWarning, match="distilled for 2 sampling steps; 3 steps are off what it learned .* sample it in 2"):
        pipe([3], seed=0, steps=3)
    info = ServedRun("student", out, pipe).info()  # what the studio and GET /api/runs offer
    assert info["steps"] == 2 and info["guidance"] == 1.0
    assert info["distilled"] == {"steps": 2, "method": "trajectory", "teacher": str(teacher)}
    assert ServedRun("teacher", teacher, Pipeline.load(teacher, device="cpu")).info()["distilled"] is None


def test_lora_student(teacher, tmp_path):
    """A few-step adapter on the teacher: only the adapters train and are saved; the base stays the teacher's."""
    out = tmp_path / "lora"
    distilled(teacher, out, "trajectory", "train.steps=2", "lora.rank=4")
    saved = load_weights(out / "ema.safetensors")
    assert saved and all("lora" in k for k in saved)
    assert load_run_config(out).lora.base_hash == load_run_config(out).distill.teacher_hash
    assert Pipeline.load(out, device="cpu")([1, 2], seed=0).shape[0] == 2


def test_ddpm_student_samples_on_its_trained_grid(tmp_path):
    """A DDPM teacher (v-prediction, learned sigma): a DDIM student, whose sampler at its steps is the DDIM path
    over the grid it was trained on."""
    ddpm = ["model.preset=\"DiT-Micro/4\"", "model.depth=2", "codec.source=\"identity\"", "model.input_size=32",
            "model.in_channels=1", "train.steps=2", "train.batch_size=4", "sample.steps=8", "train.num_threads=1",
            "train.sample_every=0", "train.checkpoint_every=2", "sample.sampler=\"ddim\""]
    train(load_config("digits-ddpm", ddpm), tmp_path / "t", progress=False)
    cfg = distilled(tmp_path / "t", tmp_path / "s", "trajectory", "train.steps=2", steps=3)
    assert (cfg.sample.sampler, cfg.sample.steps) == ("ddim", 3)
    pipe = Pipeline.load(tmp_path / "s", device="cpu")
    images = pipe([4], seed=0)
    noise = torch.randn((1, 1, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    diffusion = GaussianDiffusion.from_config(cfg.flow, cfg.model.learn_sigma)
    times = torch.cat([ddim_span(1000, 3, 1, torch.tensor([k]))[:, :1] for k in range(3)] + [torch.tensor([[-1]])], 1)
    with torch.no_grad():
        x = ddim_path(lambda x_, t: pipe.model(x_, t, y=torch.tensor([4])), diffusion, noise, times)
    assert np.abs(to_uint8(x)[:, 0].astype(int) - images.astype(int)).max() <= 1


def test_the_api_shows_a_students_steps_and_its_warning(teacher, tmp_path):
    from starlette.testclient import TestClient

    from patchflow.serve import Studio, build_app

    out = tmp_path / "student"
    distilled(teacher, out, "trajectory", "train.steps=2")
    studio = Studio([teacher, out], device="cpu")
    studio.loaded.wait(60)
    with TestClient(build_app(studio)) as client:
        runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
        assert runs["student"]["distilled"]["steps"] == 2 and runs["student"]["steps"] == 2
        assert runs["teacher"]["distilled"] is None and runs["teacher"]["steps"] == 8
        for steps, warned in ((None, False), (5, True)):
            r = client.post("/api/generate", json={"run": "student", "label": 3, "steps": steps})
            settings = json.loads(r.headers["X-Patchflow-Settings"])
            assert r.status_code == 200 and settings["steps"] == (steps or 2) and settings["seconds"] > 0
            assert ("distilled for 2 sampling steps" in " ".join(settings.get("warnings", []))) == warned, settings


def test_text_student(tmp_path, session_cache, monkeypatch):
    """A text teacher (MMDiT on color-digits pixels): the null condition of its guidance is the empty prompt."""
    monkeypatch.setenv("PATCHFLOW_CACHE", str(session_cache))
    text = ["model.arch=\"mmdit\"", "data.dataset=\"color-digits\"", "model.patch_size=8", "model.hidden_size=32",
            "model.depth=2", "model.num_heads=2", "model.text_dim=384", "model.pooled_dim=384", "text.cache=\"off\"",
            "model.input_size=32", "model.in_channels=3", "train.steps=2", "train.batch_size=4", "sample.steps=4",
            "train.num_threads=1", "train.sample_every=0", "train.checkpoint_every=2"]
    train(load_config(None, text), tmp_path / "t", progress=False)
    distilled(tmp_path / "t", tmp_path / "s", "trajectory", "train.steps=2", steps=1)
    out = Pipeline.load(tmp_path / "s", device="cpu")(prompt="a red 7 on a black background, in the center", n=1,
                                                      seed=0)
    assert out.shape == (1, 32, 32, 3) and len(read_log(tmp_path / "s")) == 2
    from patchflow.convert.sd3 import export_diffusers_sd3, import_diffusers_sd3  # conversion takes a student too

    back = import_diffusers_sd3(export_diffusers_sd3(tmp_path / "s", tmp_path / "sd3"), tmp_path / "back")
    a, b = load_weights(tmp_path / "s/ema.safetensors"), load_weights(back / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_distill_and_its_refusals(teacher, tmp_path, capsys):
    out = tmp_path / "cli"
    code, said = cli(["distill", str(teacher), "--steps", "2", "--out", str(out), "--quiet",
                      "--set", "train.steps=2", "--set", "train.batch_size=4"], capsys)
    assert code == 0 and f"student written to {out}" in said, said
    assert load_run_config(out).distill.steps == 2
    code, said = cli(["distill", str(teacher), "--steps", "2", "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "already holds a run" in said
    code, said = cli(["distill", str(teacher), "--out", str(out), "--quiet", "--resume", "--set", "train.steps=3"],
                     capsys)  # its own config (steps 2, batch 4), three steps now
    assert code == 0 and [r["step"] for r in read_log(out)] == [1, 2, 3], said
    code, said = cli(["distill", str(out), "--out", str(out), "--resume"], capsys)
    assert code == 2 and "is a student of" in said
    code, said = cli(["distill", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "is not a patchflow run directory" in said
    code, said = cli(["distill", str(teacher), "--steps", "0", "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "distill.steps must be in 1..64" in said
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, said = cli(["sample", str(out), "--label", "3", "--steps", "5", "--out", str(tmp_path / "a.png")],
                         capsys)
    assert code == 0 and (tmp_path / "a.png").is_file(), said
    off = [str(w.message) for w in seen if "distilled for" in str(w.message)]
    assert off == ["this run is a student distilled for 2 sampling steps; 5 steps are off what it learned (quality "
                   "drops): sample it in 2"], off  # once
