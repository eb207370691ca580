"""The training loop: data -> objective(model) -> AdamW with warmup, clipping, EMA, checkpoints, logs, samples.

It knows nothing about the model beyond model(*inputs, **cond), where `cond` comes from the conditioning step
(labels) and the inputs from the objective, and nothing about the objective beyond loss(). In a latent run the
codec turns each batch into latents first, unless the data comes from a latent cache.

Reliability (docs/reliability.md):
- `--resume` continues bit for bit from the last complete checkpoint, after a clean stop or a kill -9 at any
  moment. A run directory that has its config.toml but no checkpoint yet (killed before the first one) is
  started again from step 0, which is exactly what it would have computed; a directory without config.toml
  has nothing to resume and is an error.
- A step whose loss or gradient norm is NaN/Inf is skipped: no optimizer or EMA update, but the step counter,
  the LR schedule, the data order and the noise RNG advance as usual, so the run stays a pure function of its
  config. log.jsonl marks it `"skipped": true` and every record carries the running total `bad_steps`;
  `train.max_bad_steps` such steps in a row stop the run with a TrainingError naming the last checkpoint.
- A failed write (disk full, read-only, permissions) stops the run with a TrainingError that names the path,
  the errno and the intact last checkpoint; an unwritable --out is reported before any work. A checkpoint write
  that fails on one process stops every process with that same error.
- SIGTERM (a scheduler's preemption notice) finishes the current step, writes a checkpoint and exits with
  PREEMPTED_EXIT_CODE; all processes agree on the step. `--resume` continues from it bit for bit.
"""
from __future__ import annotations

import functools
import math
import random
import signal
import sys
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from patchflow.config import ConfigError, RunConfig
from patchflow.conditioning import build_conditioning
from patchflow.flops import matmul_peak, run_forward_macs, warn_if_bf16_is_slow
from patchflow.run_dir import latest_checkpoint, load_into, load_state, load_weights, save_checkpoint
from patchflow.train import distributed, inputs, rundir
from patchflow.repa.loss import repa_loss
from patchflow.train.build import PROJECTOR, attach_projector, build_trainable, load_init_weights, objective_for_run
from patchflow.train.build import split_projector
from patchflow.train.distill import WEIGHTS as TEACHER_WEIGHTS, Teacher
from patchflow.init_weights import check_base
from patchflow.lora.adapters import add_adapters, is_adapter_key, split_adapter
from patchflow.lora.quantize import plain_state, quantize_base
from patchflow.train.ema import EMA
from patchflow.train.errors import TrainingError
from patchflow.train.optim import adamw, lr_factor
from patchflow.train.prepare import Setup, prepare
from patchflow.train.previews import Previews
from patchflow.train.run_log import Meter, RunLog, model_times

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped on request after a checkpoint; rerun with --resume
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Preempted(SystemExit):
    """SIGTERM stopped training after a checkpoint. A SystemExit, so the CLI exits with PREEMPTED_EXIT_CODE
    (its handlers map errors to exit code 2); Python callers may catch it."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The loop of one run: its model, EMA, optimizer and LR schedule, train_step, fit, save and restore.

    `setup`: what the run needs resolved first (patchflow.train.prepare.Setup): patchflow.train.run.train hands in
    one whose codec presets were trained first. Without it the Trainer prepares its own, loading codecs but never
    training one. After the constructor a train_step can run on its own; fit adds the loader, logs and checkpoints.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 setup: Setup | None = None):
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        t = cfg.train
        setup = setup or prepare(cfg, self.out, resume, progress)
        self.dist, self.device, self.main = setup.dist, setup.device, setup.dist.main
        self.precision, self.chosen = setup.precision, setup.chosen  # the resolved train.precision
        self.codec, self.encode = setup.codec, False
        if self.codec is not None:  # before seeding, as a codec preset trained first was
            self.dataset, self.encode = inputs.latent_data(cfg, self.codec, self.dist, self.device, progress)
        _seed_everything(t.seed)  # the same initial weights on every process
        if self.codec is None:
            self.dataset = inputs.pixel_data(cfg)
        self.sizes, self.dataset = inputs.training_sizes(cfg, self.dataset, self.codec, self.encode, self.dist.world)
        self.aligned = setup.vision is not None  # REPA: items carry their encoder features
        if self.aligned:
            self.dataset = inputs.with_features(cfg, self.dataset, setup.vision, self.codec, self.dist, self.device,
                                                progress)
        self.net = build_trainable(cfg)
        self.lora = cfg.lora.enabled  # adapters on a frozen base: the base is read again on every start
        if t.init_from.strip() and (self.lora or not (resume and latest_checkpoint(self.out) is not None)):
            path = load_init_weights(cfg, self.net, t.init_from.strip())
            if self.lora:  # the base's sha256 is recorded in config.toml
                cfg.lora.base_hash = check_base(cfg.lora.base_hash, path, "--resume" if resume else "train.init_from")
                add_adapters(self.net, cfg.lora)
            if self.main:
                print(f"initialised from {path}" + (f", adapters of rank {cfg.lora.rank}" if self.lora else ""))
        if setup.inflate is not None:  # a video codec starting from an image codec (also on resume: step 0 must match)
            setup.inflate(self.net)
        if self.aligned:
            attach_projector(cfg, self.net, setup.vision.dim)
        self.net = self.net.to(self.device)  # the model itself; self.model may be its DDP/FSDP wrapper
        self.net.checkpoint_every = t.activation_checkpointing
        if t.compile:
            self.net.compile_blocks()
        self.sharded = self.dist.world > 1 and t.parallel == "fsdp"
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.forward_macs = run_forward_macs(cfg, self.net)
        if t.precision == "bf16":  # asked for; "auto" takes bf16 only where it measured faster
            warn_if_bf16_is_slow(self.device, "train.precision")
        self.peak_flops = t.peak_tflops * 1e12 or matmul_peak(
            DTYPES[self.precision], n=1024 if self.device.type == "cpu" else 8192, reps=3, device=self.device)
        if self.lora and cfg.lora.quantize_base:
            quantize_base(self.net)
        # FSDP gathers bf16 weights under bf16 autocast: half the all-gather and unsharded weight memory
        self.model = distributed.wrap(self.net, t.parallel, self.dist,
                                      param_dtype=torch.bfloat16 if self.precision == "bf16" else None,
                                      frozen=self.lora)
        self.ema = EMA(self.net, t.ema_decay, t.ema_warmup, skip=PROJECTOR)
        self.teacher = Teacher(cfg, self.device, resume) if cfg.distill.enabled else None  # frozen, beside the net
        self.objective = objective_for_run(cfg)
        text = inputs.text_cache(cfg, setup.text_encoder, self.dataset, self.dist, progress)
        self.conditioning = build_conditioning(cfg, self.device, text_encoder=text)
        self.opt = adamw([p for p in self.model.parameters() if p.requires_grad], lr=t.lr, betas=t.betas,
                         weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, functools.partial(
            lr_factor, steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.lr_schedule,
            decay_steps=t.lr_decay_steps, final=t.lr_final))
        self.generator = torch.Generator(self.device).manual_seed(t.seed)
        self.step = 0
        self.bad_steps = 0   # non-finite steps skipped so far
        self.bad_streak = 0  # ... of which the latest ones in a row
        self.meter = Meter(cfg, self.forward_macs, self.peak_flops, self.dist, self.device,
                           timed=bool(getattr(self.objective, "t_max", None)))
        # previews merge the EMA adapters into a LoRA run's frozen base (read off the model when a grid is drawn)
        self.previews = Previews(cfg, self.out, self.device, self.codec, self.conditioning,
                                 base=self._base_weights if self.lora else None)
        if resume:
            self._restore()
        if self.main:
            with self._stop_on_os_error("the run's config.toml"):
                rundir.write_config(self.out, cfg, setup.classes, self.chosen)

    def item_tokens(self, size) -> int:
        """Image tokens of an item of pixel size (T, H, W)."""
        return inputs.item_tokens(self.cfg, self.codec, size)

    # ---- state -------------------------------------------------------------------------------
    def _state(self) -> dict:
        """Everything but the weights, identical on every process (randomness is drawn for the global batch)."""
        return {
            "step": self.step,
            "optimizer": None if self.sharded else self.opt.state_dict(),  # sharded runs keep it in sharded/
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema_updates": self.ema.updates,
            "world_size": self.dist.world,
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "python_rng": list(random.getstate()[1]),
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
            "teacher_round": self.teacher.round if self.teacher else 0,
        }

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:  # killed before its first checkpoint: step 0 is all there is to continue from
            if self.main:
                rundir.truncate_log(self.out / "log.jsonl", 0)
                print(f"--resume: {self.out} has no checkpoint yet; starting it again from step 0")
            return
        state = load_state(ckpt / "state.pt")
        if (ckpt / "sharded").is_dir():  # written by FSDP: DCP reshards onto however many processes run now
            distributed.load_sharded(ckpt / "sharded", self.model, self.opt)
        elif self.sharded:
            raise ConfigError(f"--resume: {ckpt} was written without FSDP; resume it with train.parallel = "
                              f"\"ddp\" (any number of processes), then FSDP runs can continue from its next "
                              f"checkpoint")
        else:
            weights = load_weights(ckpt / "model.safetensors")
            if self.aligned:
                weights.update(load_weights(ckpt / "repa.safetensors"))
            if self.lora:  # the checkpoint holds the adapters; the base (int8 or not) was read from train.init_from
                load_into(self.net, weights, source=str(ckpt / "model.safetensors"),
                          only=lambda k: is_adapter_key(k) or k.startswith(PROJECTOR))
            else:
                load_into(self.net, weights, source=str(ckpt / "model.safetensors"))
            self.opt.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(load_weights(ckpt / "ema.safetensors"))
        self.step = int(state["step"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.ema.updates = int(state["ema_updates"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        random.setstate((3, tuple(state["python_rng"]), None))
        self.bad_steps, self.bad_streak = int(state.get("bad_steps", 0)), int(state.get("bad_streak", 0))
        if self.teacher and state.get("teacher_round", 0):  # a progressive round's teacher: the student it started from
            self.teacher.load_round(load_weights(ckpt / TEACHER_WEIGHTS), int(state["teacher_round"]))
        if self.main:
            rundir.truncate_log(self.out / "log.jsonl", self.step)
            print(f"resumed from {ckpt} at step {self.step}")

    def _base_weights(self) -> dict:
        """A LoRA run's frozen base weights (an int8 base dequantized), off the model, for previews."""
        return plain_state(split_adapter(split_projector(self.net.state_dict())[0])[0])

    def save(self) -> Path:
        t = self.cfg.train
        model_sd = distributed.full_model_state(self.model, self.sharded)  # collectives: every process
        extra = self.teacher.files() if self.teacher and self.main else {}
        if self.aligned and model_sd is not None:  # the projector stays in the checkpoint, out of the sampling weights
            model_sd, projector = split_projector(model_sd)
            extra["repa.safetensors"] = projector
        if self.lora and model_sd is not None:  # a LoRA run's weights are its adapters; its base stays where it is
            model_sd = split_adapter(model_sd)[1]
        ema_sd = self.ema.state_dict(keep=self.main)  # only the writing process holds the full EMA
        shards = (lambda folder: distributed.save_sharded(folder, self.model, self.opt)) if self.sharded else None
        with self._stop_on_os_error(f"checkpoint step {self.step} in {self.out / 'checkpoints'}"):
            return save_checkpoint(self.out, self.step, model_sd, ema_sd, self._state(), keep=t.keep_checkpoints,
                                   keep_every=t.keep_every, shards=shards, main=self.main,
                                   first_error=lambda error: distributed.first_error(error, self.dist), extra=extra)

    # ---- failures ----------------------------------------------------------------------------
    def _stop_on_os_error(self, what: str):
        """A failed write (disk full, read-only, permissions) stops the run with a message, not a traceback."""
        return rundir.stop_on_os_error(what, self.step, self.out)

    def _count_bad_step(self, finite: bool) -> None:
        """Track skipped non-finite steps: a total for the log and the current streak for max_bad_steps."""
        if finite:
            self.bad_streak = 0
            return
        self.bad_steps += 1
        self.bad_streak += 1
        warnings.warn(f"step {self.step}: non-finite loss or gradient norm; step skipped (weights, optimizer and "
                      f"EMA unchanged), {self.bad_streak} in a row (train.max_bad_steps = "
                      f"{self.cfg.train.max_bad_steps})", RuntimeWarning, stacklevel=3)

    def _too_many_bad_steps(self) -> TrainingError:
        first = self.step - self.bad_streak + 1
        return TrainingError(
            f"training stopped at step {self.step}: {self.bad_streak} steps in a row ({first}..{self.step}) had a "
            f"non-finite loss or gradient norm (train.max_bad_steps = {self.cfg.train.max_bad_steps}). They were "
            f"skipped, so the weights are finite. {rundir.last_checkpoint_note(self.out)} A resume with the same "
            f"settings repeats the same steps: lower train.lr or check the data first.")

    def _preempted(self, ckpt: Path) -> Preempted:
        d = self.cfg.distill
        again = f"distill {d.teacher} --steps {d.steps}" if d.enabled else "train ..."
        message = (f"stopped by SIGTERM after step {self.step} of {self.cfg.train.steps}: checkpoint {ckpt} is "
                   f"written; `patchflow {again} --out {self.out} --resume` continues from it "
                   f"(exit code {PREEMPTED_EXIT_CODE})")
        if self.main:
            print(f"patchflow train: {message}", file=sys.stderr, flush=True)
        return Preempted(message)

    def write_samples(self) -> Path | None:
        """A preview grid from the EMA weights (samples, one column per class; a codec run's reconstructions),
        with cfg.sample settings; the main process draws it."""
        return self.previews.write(self.ema, self.step, self.main)

    # ---- loop --------------------------------------------------------------------------------
    def train_step(self, batches) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss, grad norm, finite). A non-finite step updates nothing but counters."""
        t = self.cfg.train
        dtype = DTYPES[self.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.model.train()
        total = align_total = 0.0
        for i in range(t.grad_accum):
            x0, y, *features = next(batches)  # y: labels or captions; the conditioning step moves them
            if isinstance(x0, list):  # a pack of differently sized clips
                x0 = [x.to(self.device, non_blocking=True) for x in x0]
                if self.encode:
                    x0 = [self.codec.encode(x[None])[0] for x in x0]
            else:
                x0 = x0.to(self.device, non_blocking=True)
                if self.encode:  # pixels -> latents (a latent cache makes this a no-op)
                    x0 = self.codec.encode(x0)
            self.meter.count(x0)
            teacher = {}
            if self.teacher:  # a student: the teacher's guided steps need the batch's null condition too
                cond, null = self.conditioning.train_pair(y, self.generator, self.dist.shard)
                teacher["teacher"] = self.teacher.at(self.step, self.ema, cond, null)
            else:
                cond = self.conditioning.train(y, self.generator, self.dist.shard)
            times = []  # the timesteps the objective drew, for loss_by_t

            def model_fn(*inputs):
                times.append(model_times(inputs, getattr(self.objective, "t_max", None)))
                return self.model(*inputs, **cond)

            # gradients are reduced across processes once, in the last micro-batch's backward
            with distributed.grad_sync(self.model, sync=i == t.grad_accum - 1):
                with autocast:
                    losses = self.objective.loss(model_fn, x0, self.generator, shard=self.dist.shard, **teacher)
                    loss = diffusion = losses.mean()  # the logged "loss"; REPA's term is logged as "repa"
                    if features:  # REPA: the hidden states the forward kept, against the clean item's features
                        align = self._alignment(x0, features[0]).mean()
                        loss = loss + self.cfg.repa.weight * align
                        align_total += align.item() / t.grad_accum
                scaled = loss / t.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if times and times[0] is not None and times[0].shape == losses.shape and bool(losses.isfinite().all()):
                self.meter.loss_bins.add(times[0], losses)
            total += diffusion.item() / t.grad_accum
        total = distributed.mean(total, self.dist, self.device)  # each process holds the mean of an equal share
        if self.aligned:
            self.meter.aligned(distributed.mean(align_total, self.dist, self.device))
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        if self.scaler:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(total) and math.isfinite(grad_norm)
        if self.scaler:  # fp16: an overflowing gradient only lowers the loss scale; the scaler skips the step
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            if math.isfinite(total) and self.scaler.get_scale() >= scale:
                self.ema.update(self.net)
            finite = math.isfinite(total)
        elif finite:  # a NaN/Inf update would poison the weights, Adam's moments and the EMA for good
            self.opt.step()
            self.ema.update(self.net)
        self.sched.step()  # the schedule follows the step counter, skipped or not
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total, grad_norm, finite

    def _alignment(self, x0: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(B,) REPA's term for this micro-batch: x0 (B, C, [T,] H, W) the model's clean input, features (B, T, H',
        W', D) from the cache."""
        r, m = self.cfg.repa, self.cfg.model
        frames = x0.shape[2] if x0.ndim == 5 else 1
        grid = (frames // getattr(m, "temporal_patch", 1), x0.shape[-2] // m.patch_size, x0.shape[-1] // m.patch_size)
        projected, self.net.aligned = self.net.aligned, None  # the graph is freed with the step
        return repa_loss(projected, features.to(self.device, non_blocking=True), grid, r.cross_frame,
                         r.cross_frame_window)

    def fit(self) -> Path:
        """Train to train.steps from the current step: logs, checkpoints, previews; SIGTERM stops it at a step
        boundary after a checkpoint (Preempted)."""
        t = self.cfg.train
        sampler = inputs.batch_sampler(self.cfg, self.dataset, self.sizes, self.codec, self.step, self.dist.shard)
        batches = iter(inputs.loader(self.cfg, self.dataset, sampler, self.device, self.dist.rank))
        first = {"precision": self.chosen[0], "precision_rates": self.chosen[1]} if self.chosen else None
        log = RunLog(self.out, self.main, self.progress, t.steps, self.step, t.tensorboard, first=first)
        self.meter.restart()
        sigterm = []  # the handler only records the signal; the loop stops at a step boundary
        handles = threading.current_thread() is threading.main_thread()  # Python allows handlers only there
        previous = signal.signal(signal.SIGTERM, lambda *_: sigterm.append(1)) if handles else None
        try:
            while self.step < t.steps:
                loss, grad_norm, finite = self.train_step(batches)
                self._count_bad_step(finite)
                self.meter.step(loss, finite)
                log.advance()
                if self.step % t.log_every == 0 or self.step == t.steps or not finite:  # skipped steps always logged
                    log.write(self.meter.record(self.step, loss, grad_norm, self.sched.get_last_lr()[0],
                                                self.bad_steps, finite))
                if self.bad_streak >= t.max_bad_steps:
                    raise self._too_many_bad_steps()
                # every step, so all processes stop at the same one (each may get SIGTERM at a different time)
                stop = distributed.any_rank(bool(sigterm), self.dist, self.device) and self.step < t.steps
                if self.step % t.checkpoint_every == 0 or self.step == t.steps or stop:
                    ckpt = self.save()
                if stop:
                    log.close_bar()  # before the message, not over it
                    raise self._preempted(ckpt)
                if t.sample_every and (self.step % t.sample_every == 0 or self.step == t.steps):
                    with self._stop_on_os_error(f"samples in {self.out / 'samples'}"):
                        log.samples(self.write_samples(), self.step)
                    self.meter.restart()  # sampling time is not training throughput
            distributed.barrier(self.dist)  # all collectives are done everywhere before any process closes the group
        finally:
            if handles:  # None: the previous handler was not set from Python
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            log.close()
        return self.out
