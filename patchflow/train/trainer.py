"""The training loop: data -> objective(model) -> AdamW with warmup, clipping, EMA, checkpoints, logs, samples.

It knows nothing about the model beyond model(x, t, y) and nothing about the objective beyond loss().
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from patchflow.config import ConfigError, RunConfig, load_config
from patchflow.data import ResumableBatchSampler, build_dataset
from patchflow.flow.objective import build_objective
from patchflow.pipeline import build_model, generate, resolve_device, save_grid, to_uint8
from patchflow.train.checkpoint import latest_checkpoint, load_into, load_state, load_weights, save_checkpoint
from patchflow.train.ema import EMA


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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
    path.write_text("".join(k + "\n" for k in keep))


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
        elif config_path.is_file():
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or pick another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        _seed_everything(t.seed)
        self.device = resolve_device(t.device)
        self.dataset = build_dataset(cfg.data, "train")
        self.model = build_model(cfg).to(self.device)
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup)
        self.objective = build_objective(cfg.flow, cfg.model.learn_sigma)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                     weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda(t.warmup_steps))
        self.generator = torch.Generator(self.device).manual_seed(t.seed)
        self.step = 0
        if resume:
            self._restore()
        else:
            (self.out / "config.toml").write_text(cfg.to_toml())
        (self.out / "config.toml").write_text(cfg.to_toml())  # a resume may extend steps etc.

    # ---- state -------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ema_updates": self.ema.updates,
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "python_rng": list(random.getstate()[1]),
        }

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}")
        load_into(self.model, load_weights(ckpt / "model.safetensors"), source=str(ckpt / "model.safetensors"))
        load_into(self.ema.model, load_weights(ckpt / "ema.safetensors"), source=str(ckpt / "ema.safetensors"))
        state = load_state(ckpt / "state.pt")
        self.step = int(state["step"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.ema.updates = int(state["ema_updates"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        random.setstate((3, tuple(state["python_rng"]), None))
        _truncate_log(self.out / "log.jsonl", self.step)
        print(f"resumed from {ckpt} at step {self.step}")

    def save(self) -> Path:
        return save_checkpoint(self.out, self.step, self.model, self.ema.model, self._state(),
                               keep=self.cfg.train.keep_checkpoints)

    def write_samples(self) -> Path:
        """A grid from the EMA model: one column per class, cfg.sample settings."""
        m = self.cfg.model
        rows = max(1, min(10, 100 // m.num_classes))
        labels = torch.arange(m.num_classes).repeat(rows)
        was_training = self.ema.model.training
        x = generate(self.ema.model, self.cfg, labels, device=self.device)
        self.ema.model.train(was_training)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        save_grid(to_uint8(x)[:, 0], path, nrow=m.num_classes)
        return path

    # ---- loop --------------------------------------------------------------------------------
    def train_step(self, batches) -> tuple[float, float]:
        t = self.cfg.train
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if t.precision == "bf16"
                    else nullcontext())
        self.model.train()
        total = 0.0
        for _ in range(t.grad_accum):
            x0, y = next(batches)
            x0, y = x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast:
                loss = self.objective.loss(lambda x, s: self.model(x, s, y), x0, self.generator).mean()
            (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        return total, grad_norm

    def fit(self) -> Path:
        t = self.cfg.train
        sampler = ResumableBatchSampler(len(self.dataset), t.batch_size, seed=t.seed, start=self.step * t.grad_accum)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             # its own generator: iter() must not draw from the global RNG
                                             generator=torch.Generator().manual_seed(t.seed))
        batches = iter(loader)
        log = open(self.out / "log.jsonl", "a")
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        images_per_step = t.batch_size * t.grad_accum
        window_start, window_losses = time.perf_counter(), []
        try:
            while self.step < t.steps:
                loss, grad_norm = self.train_step(batches)
                window_losses.append(loss)
                if bar is not None:
                    bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    rate = images_per_step * len(window_losses) / max(elapsed, 1e-9)
                    record = {"step": self.step, "loss": loss, "loss_avg": sum(window_losses) / len(window_losses),
                              "grad_norm": grad_norm, "lr": self.sched.get_last_lr()[0], "images_per_s": rate}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss_avg']:.4f}", img_s=f"{rate:.0f}")
                    window_start, window_losses = time.perf_counter(), []
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save()
                if t.sample_every and (self.step % t.sample_every == 0 or self.step == t.steps):
                    self.write_samples()
                    window_start = time.perf_counter()  # sampling time is not training throughput
        finally:
            log.close()
            if bar is not None:
                bar.close()
        return self.out


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(cfg, out_dir, resume=resume, progress=progress).fit()
