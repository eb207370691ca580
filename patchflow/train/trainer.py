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

import dataclasses
import errno
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from patchflow.config import ConfigError, RunConfig, load_config
from patchflow.data import (ResumableBatchSampler, WithCaptions, build_dataset, images_config, mix_images,
                            pixel_shape)
from patchflow.conditioning import build_conditioning
from patchflow.flops import matmul_peak, mfu_of_macs, run_forward_macs, warn_if_bf16_is_slow
from patchflow.train.build import build_trainable, objective_for_run
from patchflow.pipeline import preview, resolve_device, save_grid
from patchflow.train import distributed
from patchflow.train.codec import inflation
from patchflow.run_dir import (atomic_write_text, latest_checkpoint, load_into, load_state, load_weights,
                                        save_checkpoint, step_of)
from patchflow.train.ema import EMA
from patchflow.train.optim import adamw, lr_factor
from patchflow.train.run_log import (TimestepBins, model_times, open_tensorboard, tensorboard_record,
                                     tensorboard_samples)
from patchflow.train.errors import TrainingError


PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped on request after a checkpoint; rerun with --resume


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


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(k + "\n" for k in keep))  # a second crash here must not lose the log


def _describe_os_error(e: OSError) -> str:
    """'No space left on device [ENOSPC] at /path' from an OSError."""
    code = errno.errorcode.get(e.errno, f"errno {e.errno}") if e.errno else "no errno"
    where = f" at {e.filename}" if e.filename else ""
    return f"{e.strerror or e} [{code}]{where}"


def _prepare_out_dir(out: Path) -> None:
    """Create the run directory and prove it is writable, so a bad --out fails before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to the run directory {out}: {_describe_os_error(e)}; "
                            f"pick another --out") from e


def _check_classes(cfg: RunConfig) -> list[str]:
    """The class folder names of a class run on the user's folder (label = position; [] otherwise), checked:
    model.num_classes must cover them (a label >= num_classes would be taken for the null class of guidance, or
    fail in the embedding)."""
    d = cfg.data
    if cfg.is_text_run or d.dataset not in ("folder", "video") or not Path(d.path).expanduser().is_dir():
        return []  # a missing folder is reported, with its key, when the data set is built
    from patchflow.data.folder import find_images
    from patchflow.data.video import find_clips

    with warnings.catch_warnings():  # the data set warns about loose files itself, once
        warnings.simplefilter("ignore")
        classes, _ = (find_images if d.dataset == "folder" else find_clips)(Path(d.path).expanduser())
    if len(classes) > cfg.model.num_classes:
        raise ConfigError(f"data.path = {d.path!r} has {len(classes)} class folders ({', '.join(classes[:5])}"
                          f"{', ...' if len(classes) > 5 else ''}) but model.num_classes = {cfg.model.num_classes}; "
                          f"set model.num_classes = {len(classes)}")
    return classes


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers leave SIGTERM to the trainer (SLURM signals every process of a job), which stops them itself
    after its checkpoint; a worker killed by it would make the DataLoader raise mid-step."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN/Inf


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        t = cfg.train
        config_path = self.out / "config.toml"
        if resume:
            if not config_path.is_file():
                raise FileNotFoundError(f"--resume: {config_path} not found; nothing to resume in {self.out}")
            saved = load_config(config_path)
            if saved.model != cfg.model:
                raise ConfigError(f"--resume: [model] differs from the run's {config_path}; a run keeps its model")
            if saved.codec.source != cfg.codec.source:
                raise ConfigError(f"--resume: codec.source = {cfg.codec.source!r} differs from the run's "
                                  f"{saved.codec.source!r} ({config_path}); a run keeps its codec")
        elif config_path.is_file():
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or pick another --out")
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.dist, self.device = distributed.init(resolve_device(t.device))
        self.main = self.dist.main
        if t.batch_size % self.dist.world:
            raise ConfigError(f"train.batch_size = {t.batch_size} is the global batch and must be divisible by the "
                              f"{self.dist.world} processes")
        distributed.barrier(self.dist)  # every process has checked the run directory before the main one writes
        if self.main:
            _prepare_out_dir(self.out)
        if cfg.is_text_run:  # a missing or mismatched text encoder fails here, before a codec is trained
            from patchflow.conditioning import load_run_text_encoder

            self.text_encoder = load_run_text_encoder(cfg, self.device)
        classes = _check_classes(cfg)  # before a codec is trained on data whose labels the model cannot take
        self.codec, self.encode = None, False
        if cfg.codec.source != "identity":  # before seeding: a codec preset may be trained first
            self._prepare_codec(resume)
        inflate = inflation(cfg, progress=self.progress)  # before seeding too: its image codec may be trained first
        _seed_everything(t.seed)  # the same initial weights on every process
        if self.codec is None:
            self.dataset = build_dataset(cfg.data, "train", text=cfg.is_text_run)
            if cfg.data.mix_images:
                self.dataset = mix_images(self.dataset, build_dataset(images_config(cfg.data), "train", text=True),
                                          cfg.data.mix_images)
        self.sizes = self._sizes()
        self.net = build_trainable(cfg)
        if t.init_from.strip() and not (resume and latest_checkpoint(self.out) is not None):
            self._init_from(t.init_from.strip())
        if inflate is not None:  # a video codec starting from an image codec (also on resume: step 0 must match)
            inflate(self.net)
        self.net = self.net.to(self.device)  # the model itself; self.model may be its DDP/FSDP wrapper
        self.net.checkpoint_every = t.activation_checkpointing
        if t.compile:
            self.net.compile_blocks()
        self.sharded = self.dist.world > 1 and t.parallel == "fsdp"
        if self.device.type == "cuda":  # TF32 matmuls: fp32 training at tensor-core speed
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif t.precision == "fp16":
            raise ConfigError("train.precision = \"fp16\" needs a CUDA device (its grad scaler is for GPUs); "
                              "use \"bf16\" on CPUs")
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.forward_macs = run_forward_macs(cfg, self.net)
        if t.precision == "bf16":
            warn_if_bf16_is_slow(self.device, "train.precision")
        self.peak_flops = t.peak_tflops * 1e12 or matmul_peak(
            torch.float32 if t.precision == "fp32" else torch.bfloat16 if t.precision == "bf16" else torch.float16,
            n=1024 if self.device.type == "cpu" else 8192, reps=3, device=self.device)
        # FSDP gathers bf16 weights under bf16 autocast: half the all-gather and unsharded weight memory
        self.model = distributed.wrap(self.net, t.parallel, self.dist,
                                      param_dtype=torch.bfloat16 if t.precision == "bf16" else None)
        self.ema = EMA(self.net, t.ema_decay, t.ema_warmup)
        self.objective = objective_for_run(cfg)
        self.conditioning = build_conditioning(cfg, self.device, text_encoder=self._text_cache())
        self.opt = adamw(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, functools.partial(
            lr_factor, steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.lr_schedule,
            decay_steps=t.lr_decay_steps, final=t.lr_final))
        self.generator = torch.Generator(self.device).manual_seed(t.seed)
        self.step = 0
        self.bad_steps = 0   # non-finite steps skipped so far
        self.bad_streak = 0  # ... of which the latest ones in a row
        if resume:
            self._restore()
        # atomic: a kill here must not leave a cut config.toml (a resume may change steps etc., so rewrite it)
        if self.main:
            with self._stop_on_os_error("the run's config.toml"):
                atomic_write_text(config_path, cfg.to_toml())
                if classes:  # label -> class folder name, for people choosing a class (serve, sample)
                    atomic_write_text(self.out / "classes.json", json.dumps(classes, indent=1))

    def _prepare_codec(self, resume: bool) -> None:
        """The run's codec and its data: cached latents when codec.cache allows (the main process builds a missing
        "auto" cache, the others wait for it), else pixels that each step encodes (self.encode)."""
        from patchflow.data.latent_cache import cached_dataset
        from patchflow.train.codec import codec_for_run

        cfg = self.cfg
        if self.main:
            self.codec = codec_for_run(cfg, self.out, resume, main=True, progress=self.progress)
            dataset = cached_dataset(cfg, self.codec, progress=self.progress, build=True)
        distributed.barrier(self.dist)
        if not self.main:
            self.codec = codec_for_run(cfg, self.out, resume, main=False, progress=False)
            dataset = cached_dataset(cfg, self.codec, progress=False, build=False)
        self.codec.to(self.device)
        text = cfg.is_text_run
        if dataset is not None and text:  # latents from the cache, captions from the data set (no images read)
            dataset = WithCaptions(dataset, build_dataset(cfg.data, "train", text=True))
        self.dataset = dataset if dataset is not None else build_dataset(cfg.data, "train", text=text)
        self.encode = dataset is None
        if cfg.data.mix_images:  # color-digits images as one-frame clips, through the same codec and cache
            images_cfg = dataclasses.replace(cfg, data=images_config(cfg.data))
            images = cached_dataset(images_cfg, self.codec, progress=self.progress and self.main, build=self.main)
            distributed.barrier(self.dist)
            if images is None or self.encode:
                images = build_dataset(images_cfg.data, "train", text=True)
            else:
                images = WithCaptions(images, build_dataset(images_cfg.data, "train", text=True))
            self.dataset = mix_images(self.dataset, images, cfg.data.mix_images)

    def _init_from(self, source: str) -> None:
        """train.init_from: a run directory's EMA weights (its latest checkpoint's when the run is unfinished) or a
        .safetensors file, strict; an image MMDiT into a video model through models.video.load_image_weights."""
        path = Path(source).expanduser()
        if path.is_dir():
            ckpt = path / "ema.safetensors"
            if not ckpt.is_file():
                latest = latest_checkpoint(path)
                if latest is None:
                    raise FileNotFoundError(f"train.init_from = {source!r}: no ema.safetensors and no checkpoint in it")
                ckpt = latest / "ema.safetensors"
            path = ckpt
        weights = load_weights(path)
        try:
            if self.cfg.model.arch == "video":  # a video run's weights, or an image MMDiT's (temporal blocks left)
                from patchflow.models.video import load_image_weights

                load_image_weights(self.net, weights)
            else:
                load_into(self.net, weights, source=str(path))
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"train.init_from = {source!r}: {e}") from None
        if self.main:
            print(f"initialised from {path}")

    def _sizes(self) -> list[tuple[int, int, int]] | None:
        """Each item's training size (frames, height, width) in pixels when the run trains on several sizes
        (data.buckets, or packing of mixed images and clips), the data cut to it; None for one fixed size.
        A captions file's items have their own frames (images 1, clips data.frames): without buckets or packing
        they must all have the model's (data.check_dense_frames)."""
        from patchflow.data import check_dense_frames, item_frames
        from patchflow.data.buckets import CutClips, assign_sizes, check_buckets, parse_buckets

        cfg, d = self.cfg, self.cfg.data
        _, frames, size = pixel_shape(d)
        codec = self.codec
        latent = (lambda s: s) if codec is None else \
            (lambda s: tuple(codec.latent_shape((1, codec.in_channels or 3, *s))[2:]))
        if not d.buckets and not cfg.train.pack_tokens:
            try:
                check_dense_frames(self.dataset, getattr(cfg.model, "frames", 1), lambda t: latent((t, size, size))[0])
            except ValueError as e:
                raise ConfigError(str(e)) from None
            return None
        counts = item_frames(self.dataset)  # a captions file: each item's own frames
        native = [(t, size, size) for t in counts] if counts is not None else \
            [(frames, size, size)] * (len(self.dataset) - d.mix_images) + [(1, size, size)] * d.mix_images
        sizes = native
        if d.buckets:
            buckets = parse_buckets(d.buckets)
            try:
                sizes = assign_sizes(native, buckets, seed=d.seed)
                check_buckets(buckets, sizes, patch=(cfg.model.temporal_patch, cfg.model.patch_size,
                                                     cfg.model.patch_size), latent=latent,
                              codec_ok=None if codec is None else (lambda s: codec.frames_ok(s[0])),
                              world=1 if cfg.train.pack_tokens else self.dist.world)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        # the data's frames: latent frames from a latent cache, pixel frames when each step encodes (codec.cache off)
        frames_of = (lambda s: s[0]) if self.encode else (lambda s: latent(s)[0])
        cut = [frames_of(s) for s in sizes]
        if any(f != frames_of(n) for f, n in zip(cut, native)):
            self.dataset = CutClips(self.dataset, cut)
        return sizes

    def _batch_sampler(self):
        """Dense batches of one size (ResumableBatchSampler), one bucket's size per batch (BucketBatchSampler), or
        packs of any sizes under train.pack_tokens image tokens (PackedBatchSampler)."""
        from patchflow.data.buckets import BucketBatchSampler, PackedBatchSampler, parse_buckets

        t, start = self.cfg.train, self.step * self.cfg.train.grad_accum
        if self.sizes is None:
            return ResumableBatchSampler(len(self.dataset), t.batch_size, seed=t.seed, start=start,
                                         shard=self.dist.shard)
        if t.pack_tokens:
            tokens = [self.item_tokens(s) for s in self.sizes]
            return PackedBatchSampler(tokens, t.pack_tokens, seed=t.seed, start=start, shard=self.dist.shard)
        return BucketBatchSampler(self.sizes, parse_buckets(self.cfg.data.buckets), seed=t.seed, start=start,
                                  shard=self.dist.shard)

    def item_tokens(self, size) -> int:
        """Image tokens of an item of pixel size (T, H, W)."""
        m, codec = self.cfg.model, self.codec
        t, h, w = size if codec is None else codec.latent_shape((1, codec.in_channels or 3, *size))[2:]
        return (t // getattr(m, "temporal_patch", 1)) * (h // m.patch_size) * (w // m.patch_size)

    def _text_cache(self):
        """A text run's frozen encoder, behind its embedding cache unless text.cache = "off": the main process
        encodes every training caption once before the first step, the others wait and read the cache."""
        cfg = self.cfg
        if not cfg.is_text_run:
            return None
        from patchflow.data import captions_of
        from patchflow.paths import cache_root
        from patchflow.text import TextEmbeddingCache

        encoder = self.text_encoder
        setting = cfg.text.cache.strip()
        if setting == "off":
            return encoder
        directory = cache_root() / "text" if setting == "auto" else Path(setting).expanduser()
        if self.main:
            cache = TextEmbeddingCache(directory, encoder)
            cache.precompute(captions_of(self.dataset), progress=self.progress)
        distributed.barrier(self.dist)
        return cache if self.main else TextEmbeddingCache(directory, encoder)

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
        }

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:  # killed before its first checkpoint: step 0 is all there is to continue from
            if self.main:
                _truncate_log(self.out / "log.jsonl", 0)
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
            load_into(self.net, load_weights(ckpt / "model.safetensors"), source=str(ckpt / "model.safetensors"))
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
        if self.main:
            _truncate_log(self.out / "log.jsonl", self.step)
            print(f"resumed from {ckpt} at step {self.step}")

    def save(self) -> Path:
        t = self.cfg.train
        model_sd = distributed.full_model_state(self.model, self.sharded)  # collectives: every process
        ema_sd = self.ema.state_dict(keep=self.main)  # only the writing process holds the full EMA
        shards = (lambda folder: distributed.save_sharded(folder, self.model, self.opt)) if self.sharded else None
        with self._stop_on_os_error(f"checkpoint step {self.step} in {self.out / 'checkpoints'}"):
            return save_checkpoint(self.out, self.step, model_sd, ema_sd, self._state(), keep=t.keep_checkpoints,
                                   keep_every=t.keep_every, shards=shards, main=self.main,
                                   first_error=lambda error: distributed.first_error(error, self.dist))

    # ---- failures ----------------------------------------------------------------------------
    def _last_checkpoint_note(self) -> str:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return f"No checkpoint was written yet in {self.out / 'checkpoints'}."
        return (f"The last good checkpoint {ckpt} (step {step_of(ckpt)}) is intact; "
                f"`patchflow train ... --out {self.out} --resume` continues from it.")

    @contextmanager
    def _stop_on_os_error(self, what: str):
        """A failed write (disk full, read-only, permissions) stops the run with a message, not a traceback."""
        try:
            yield
        except OSError as e:
            raise TrainingError(f"could not write {what} at step {self.step}: {_describe_os_error(e)}. "
                                f"Training stopped. {self._last_checkpoint_note()}") from e

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
            f"skipped, so the weights are finite. {self._last_checkpoint_note()} A resume with the same settings "
            f"repeats the same steps: lower train.lr or check the data first.")

    def _preempted(self, ckpt: Path) -> Preempted:
        message = (f"stopped by SIGTERM after step {self.step} of {self.cfg.train.steps}: checkpoint {ckpt} is "
                   f"written; `patchflow train ... --out {self.out} --resume` continues from it "
                   f"(exit code {PREEMPTED_EXIT_CODE})")
        if self.main:
            print(f"patchflow train: {message}", file=sys.stderr, flush=True)
        return Preempted(message)

    def write_samples(self) -> Path | None:
        """A preview grid from the EMA weights (samples, one column per class; a codec run's reconstructions),
        with cfg.sample settings; the main process draws it."""
        ema_sd = self.ema.state_dict(keep=self.main)  # a collective when sharded
        if not self.main:
            return None
        if not hasattr(self, "_sampler_model"):  # a plain copy of the model for the EMA weights
            self._sampler_model = build_trainable(self.cfg).to(self.device).eval().requires_grad_(False)
        self._sampler_model.load_state_dict(ema_sd)
        images, nrow = preview(self._sampler_model, self.cfg, self.codec, device=self.device,
                               conditioning=self.conditioning)
        path = self.out / "samples" / f"step_{self.step:07d}{'.gif' if images.ndim == 5 else '.png'}"
        path.parent.mkdir(exist_ok=True)
        save_grid(images, path, nrow=nrow)
        return path

    # ---- loop --------------------------------------------------------------------------------
    def _macs_of(self, shape: tuple) -> int:
        """Forward MACs of one item of this (C, T, H, W) model-input shape: the run's figure at the training size;
        other sizes (a video run's images and shorter clips) scaled by their tokens, prompt tokens included (the
        attention's quadratic share is small at these lengths). No forward pass: under FSDP every process would
        have to run it together."""
        if shape not in self._macs:
            m = self.cfg.model
            if self.cfg.model.arch != "video" or len(shape) != 4:
                self._macs[shape] = self.forward_macs
            else:
                from patchflow.models import TEXT_TOKENS

                tokens = lambda t, h, w: t // m.temporal_patch * (h // m.patch_size) * (w // m.patch_size)  # noqa
                ratio = (tokens(*shape[1:]) + TEXT_TOKENS) / (tokens(m.frames, m.input_size, m.input_size)
                                                              + TEXT_TOKENS)
                self._macs[shape] = round(self.forward_macs * ratio)
        return self._macs[shape]

    def train_step(self, batches) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss, grad norm, finite). A non-finite step updates nothing but counters."""
        t = self.cfg.train
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.model.train()
        total = 0.0
        for i in range(t.grad_accum):
            x0, y = next(batches)  # y: labels or captions; the conditioning step moves them
            if isinstance(x0, list):  # a pack of differently sized clips
                x0 = [x.to(self.device, non_blocking=True) for x in x0]
                if self.encode:
                    x0 = [self.codec.encode(x[None])[0] for x in x0]
            else:
                x0 = x0.to(self.device, non_blocking=True)
                if self.encode:  # pixels -> latents (a latent cache makes this a no-op)
                    x0 = self.codec.encode(x0)
            self.items += len(x0)
            self.macs += sum(self._macs_of(tuple(x.shape)) for x in x0) if isinstance(x0, list) else \
                len(x0) * self._macs_of(tuple(x0.shape[1:]))
            cond = self.conditioning.train(y, self.generator, self.dist.shard)
            times = []  # the timesteps the objective drew, for loss_by_t

            def model_fn(*inputs):
                times.append(model_times(inputs, getattr(self.objective, "t_max", None)))
                return self.model(*inputs, **cond)

            # gradients are reduced across processes once, in the last micro-batch's backward
            with distributed.grad_sync(self.model, sync=i == t.grad_accum - 1):
                with autocast:
                    losses = self.objective.loss(model_fn, x0, self.generator, shard=self.dist.shard)
                    loss = losses.mean()
                scaled = loss / t.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if times and times[0] is not None and times[0].shape == losses.shape and bool(losses.isfinite().all()):
                self.loss_bins.add(times[0], losses)
            total += loss.item() / t.grad_accum
        total = distributed.mean(total, self.dist, self.device)  # each process holds the mean of an equal share
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

    def fit(self) -> Path:
        t = self.cfg.train
        from patchflow.data.buckets import collate_list

        sampler = self._batch_sampler()
        packed = self.cfg.train.pack_tokens > 0
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                                             collate_fn=collate_list if packed else None,
                                             pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_sigterm,
                                             # its own generator (per process): iter() must not draw from the
                                             # global RNG, and workers get per-process seeds
                                             generator=torch.Generator().manual_seed(t.seed + self.dist.rank))
        batches = iter(loader)
        log_path = self.out / "log.jsonl"
        log = None
        if self.main:
            with self._stop_on_os_error(str(log_path)):
                log = open(log_path, "a")
        bar = None
        if self.progress and self.main:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        self._macs = {}  # forward MACs per item shape (a video run's images and clips differ)
        self.loss_bins = TimestepBins()  # this process's samples; summed over processes when logged
        board = open_tensorboard(self.out, t.tensorboard and self.main, self.step)
        self.items = self.macs = 0
        window_start, window_steps, window_losses = time.perf_counter(), 0, []
        sigterm = []  # the handler only records the signal; the loop stops at a step boundary
        handles = threading.current_thread() is threading.main_thread()  # Python allows handlers only there
        previous = signal.signal(signal.SIGTERM, lambda *_: sigterm.append(1)) if handles else None
        try:
            while self.step < t.steps:
                loss, grad_norm, finite = self.train_step(batches)
                self._count_bad_step(finite)
                window_steps += 1
                if finite:
                    window_losses.append(loss)
                if bar is not None:
                    bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps or not finite:  # skipped steps always logged
                    elapsed = time.perf_counter() - window_start
                    rate = self.items * self.dist.world / max(elapsed, 1e-9)  # items (images or clips) per second
                    macs_per_s = self.macs * self.dist.world / max(elapsed, 1e-9)
                    avg = sum(window_losses) / len(window_losses) if window_losses else None
                    record = {"step": self.step, "loss": _finite_or_none(loss), "loss_avg": avg,
                              "grad_norm": _finite_or_none(grad_norm), "lr": self.sched.get_last_lr()[0],
                              "images_per_s": rate, "steps_per_s": window_steps / max(elapsed, 1e-9),
                              "mfu": mfu_of_macs(macs_per_s, self.peak_flops * self.dist.world),
                              "bad_steps": self.bad_steps}
                    if getattr(self.objective, "t_max", None):  # codec runs have no timestep
                        record["loss_by_t"] = self.loss_bins.pop(
                            lambda x: distributed.total(x, self.dist, self.device))
                    if not finite:
                        record["skipped"] = True
                    if log is not None:
                        with self._stop_on_os_error(str(log_path)):
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                    if board is not None:
                        tensorboard_record(board, record)
                    if bar is not None and avg is not None:
                        bar.set_postfix(loss=f"{avg:.4f}", img_s=f"{rate:.0f}", mfu=f"{100 * record['mfu']:.0f}%")
                    window_start, window_steps, window_losses = time.perf_counter(), 0, []
                    self.items = self.macs = 0
                if self.bad_streak >= t.max_bad_steps:
                    raise self._too_many_bad_steps()
                # every step, so all processes stop at the same one (each may get SIGTERM at a different time)
                stop = distributed.any_rank(bool(sigterm), self.dist, self.device) and self.step < t.steps
                if self.step % t.checkpoint_every == 0 or self.step == t.steps or stop:
                    ckpt = self.save()
                if stop:
                    if bar is not None:
                        bar.close()  # before the message, not over it
                    raise self._preempted(ckpt)
                if t.sample_every and (self.step % t.sample_every == 0 or self.step == t.steps):
                    with self._stop_on_os_error(f"samples in {self.out / 'samples'}"):
                        tensorboard_samples(board, self.write_samples(), self.step)
                    window_start = time.perf_counter()  # sampling time is not training throughput
                    self.items = self.macs = 0
            distributed.barrier(self.dist)  # all collectives are done everywhere before any process closes the group
        finally:
            if handles:  # None: the previous handler was not set from Python
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            try:
                if board is not None:
                    board.close()
                if log is not None:
                    log.close()
            except OSError:
                pass  # a full disk fails the flush again; the error that stopped the run is already on its way
            if bar is not None:
                bar.close()
        return self.out


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train on this process, or as one of torchrun's processes (WORLD_SIZE > 1): DDP or FSDP2."""
    try:
        out = Trainer(cfg, out_dir, resume=resume, progress=progress).fit()
    finally:
        distributed.shutdown()
    if cfg.is_codec_run and int(os.environ.get("RANK", "0")) == 0:  # the codec, with its latent statistics
        from patchflow.train.codec import export_codec

        export_codec(out, cfg)
    return out
