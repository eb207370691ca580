"""The worker: one thread owns the models and samples one request at a time (a model already uses every core);
requests wait in a bounded queue, so two users at once both get their results, in order. Every sample is drawn on
its own (n = 1, seed = seed + k), so the settings beside it reproduce it exactly with `patchflow sample`."""
from __future__ import annotations

import collections
import io
import itertools
import queue
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchflow.edit import default_strength
from patchflow.sample_request import RequestError
from patchflow.serve.requests import reproduce_command, resolve
from patchflow.serve.runs import ServedRun, check_runs, class_names, example_prompt, fitting_loras, lora_names, run_names

KEEP_JOBS = 256           # finished jobs whose results stay fetchable


def encode(sample: np.ndarray) -> tuple[bytes, str]:
    """An image (H, W, C) -> PNG bytes, a clip (T, H, W, 3) -> GIF bytes; with the media type."""
    from PIL import Image

    from patchflow.clip_files import gif_bytes

    if sample.ndim == 4:
        return gif_bytes(sample), "image/gif"
    buffer = io.BytesIO()
    Image.fromarray(sample[..., 0] if sample.shape[-1] == 1 else sample).save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def grid_bytes(samples: list[np.ndarray]) -> tuple[bytes, str]:
    """Several samples as one PNG (images) or GIF (clips) grid, as `patchflow sample` draws them."""
    from patchflow.media.grids import grid

    x = np.stack(samples)
    nrow = min(len(samples), 4)
    if x.ndim == 5:  # clips: a grid per frame
        return encode(np.stack([grid(x[:, t], nrow=nrow) for t in range(x.shape[1])]))
    return encode(grid(x, nrow=nrow))


@dataclass
class Job:
    id: str
    run: ServedRun
    kw: dict
    n: int
    seed: int
    lora: tuple = (None, 1.0)   # (adapter name, scale) merged in for this job
    status: str = "queued"      # queued | running | done | error
    done_steps: int = 0
    total_steps: int = 0
    samples: list = field(default_factory=list)   # uint8 arrays, one per seed
    seconds: list = field(default_factory=list)   # each sample's sampling time
    notes: list = field(default_factory=list)     # what sampling warned of (a resized input, a student's off steps)
    items: list = field(default_factory=list)     # (bytes, media type, settings)
    error: tuple[int, str] | None = None
    created: float = field(default_factory=time.time)
    finished: threading.Event = field(default_factory=threading.Event)

    def settings(self, k: int) -> dict:
        kw = self.kw
        s = {"run": self.run.name, "seed": self.seed + k, "steps": kw["steps"], "guidance": kw["guidance"],
             "sampler": kw["sampler"]}
        if "labels" in kw:
            s["label"] = kw["labels"]
            names = self.run.class_names or []
            if kw["labels"] < len(names):
                s["class_name"] = names[kw["labels"]]
        else:
            s["prompt"] = kw["prompt"]
            s["negative_prompt"] = kw.get("negative_prompt")
        h, w = kw.get("size") or self.run.pipe.pixel_size(None)
        s.update(height=h, width=w)
        if self.run.pipe.cfg.kind.video:
            s["frames"] = kw.get("frames") or self.run.pipe.pixel_frames()
            s["first_frame"] = "first_frame" in kw
        if "init_image" in kw:
            strength = kw.get("strength", default_strength(kw.get("mask")))
            s.update(init_image=True, mask="mask" in kw, strength=strength)
        s["seconds"] = round(self.seconds[k], 3)
        if self.notes:
            s["warnings"] = self.notes
        if self.lora[0] is not None:
            s["lora"], s["lora_scale"] = self.lora
        s["command"] = reproduce_command(self.run, kw, self.seed + k, self.lora)
        return s

    def state(self, position: int | None) -> dict:
        out = {"id": self.id, "status": self.status, "run": self.run.name, "n": self.n,
               "progress": {"done": self.done_steps, "total": self.total_steps}, "queue_position": position}
        if self.error:
            out["error"] = self.error[1]
        if self.status == "done":
            out["items"] = [{"url": f"/api/jobs/{self.id}/items/{k}", "media_type": media, "settings": s}
                            for k, (_, media, s) in enumerate(self.items)]
        return out


class Studio:
    """The served runs, the queue and the one worker thread that samples."""

    def __init__(self, runs: list[str | Path], device: str = "auto", max_queue: int = 32, use_ema: bool = True,
                 loras: list[str] = ()):
        """loras: `[NAME=]ADAPTER` specs; a request picks one by name (`lora`, `lora_scale`) for a run it fits."""
        self.paths = check_runs(runs)
        self.names = run_names(self.paths)
        self.adapters = lora_names(list(loras))
        self.unused_loras: dict[str, str] = {}  # adapter name -> why no served run takes it (said at start)
        self.device, self.use_ema = device, use_ema
        self.runs: dict[str, ServedRun] = {}
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.waiting: list[str] = []  # ids in queue order, for the page's "n ahead of you"
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.worker = threading.Thread(target=self._work, name="patchflow-sampler", daemon=True)
        self.worker.start()

    # the worker ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        from patchflow.pipeline import Pipeline

        try:
            refused: dict[str, dict[str, str]] = {}
            for name, path in zip(self.names, self.paths):
                pipe = Pipeline.load(path, ema=self.use_ema, device=self.device)
                run = ServedRun(name, path, pipe, example_prompt(pipe.cfg), class_names(path))
                if self.adapters:  # the run's own weights stay on the side, to merge a request's adapter into
                    run.base = {k: v.detach().cpu().clone() for k, v in pipe.model.state_dict().items()}
                    run.loras = fitting_loras(run, self.adapters, self.use_ema, refused)
                    run.base = run.base if run.loras else None
                self.runs[name] = run
            taken = {a for run in self.runs.values() for a in run.loras}
            self.unused_loras = {a: "; ".join(f"run {r!r}: {e}" for r, e in refused.get(a, {}).items())
                                 for a in self.adapters if a not in taken}
        except Exception as e:  # noqa: BLE001 -- reported by serve(), which then stops, and on every request
            self.load_error = f"could not load run {str(path)!r}: {e}"
        finally:
            self.loaded.set()

    def _work(self) -> None:
        self._load()
        while True:
            job = self.queue.get()
            with self.lock:
                self.waiting.remove(job.id)
                job.status = "running"
            try:
                self._sample(job)
                job.status = "done"
            except ValueError as e:  # the request's fault, found while sampling (RequestError among them)
                job.error, job.status = (getattr(e, "status", 400), str(e)), "error"
            except Exception as e:  # noqa: BLE001 -- a bug must not kill the worker: report it and go on
                traceback.print_exc()
                job.error, job.status = (500, f"sampling failed: {type(e).__name__}: {e}"), "error"
            finally:
                job.finished.set()
                self._forget_old()

    def _sample(self, job: Job) -> None:
        if job.run.loras:
            job.run.use(*job.lora)
        for k in range(job.n):
            def progress(done: int, total: int, k: int = k) -> None:  # total: one sample's sampling steps
                job.total_steps, job.done_steps = job.n * total, k * total + done

            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as said:  # the settings beside the sample carry them
                warnings.simplefilter("always", UserWarning)
                sample = job.run.pipe(**job.kw, n=1, seed=job.seed + k, progress=progress)[0]
            job.notes = list(dict.fromkeys([*job.notes, *(str(w.message) for w in said
                                                          if issubclass(w.category, UserWarning))]))
            job.seconds.append(time.perf_counter() - t0)
            job.samples.append(sample)
            data, media = encode(sample)
            job.items.append((data, media, job.settings(k)))

    def _forget_old(self) -> None:
        with self.lock:
            finished = [i for i, j in self.jobs.items() if j.finished.is_set()]
            for i in finished[:max(0, len(finished) - KEEP_JOBS)]:
                del self.jobs[i]

    # the handlers' side ------------------------------------------------------------------------------------
    def runs_info(self) -> list[dict]:
        self.wait_loaded()
        return [r.info() for r in self.runs.values()]

    def wait_loaded(self) -> None:
        if not self.loaded.wait(timeout=300):
            raise RequestError("the runs are still loading; try again in a moment", 503)
        if self.load_error:
            raise RequestError(self.load_error, 503)

    def submit(self, req) -> Job:
        self.wait_loaded()
        run, kw, lora = resolve(req, self.runs)
        s = run.pipe.cfg.sample
        kw = {**kw, "steps": kw["steps"] or s.steps, "guidance": s.guidance if kw["guidance"] is None
              else kw["guidance"], "sampler": kw["sampler"] or s.sampler}
        job = Job(id=f"{next(self.ids)}-{int(time.time() * 1000) % 100000}", run=run, kw=kw, n=req.n, seed=req.seed,
                  lora=lora, total_steps=req.n * kw["steps"])
        with self.lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise RequestError(f"{self.queue.maxsize} requests are waiting already; try again shortly",
                                   503) from None
            self.waiting.append(job.id)
            self.jobs[job.id] = job
        return job

    def position(self, job: Job) -> int | None:
        with self.lock:
            return self.waiting.index(job.id) if job.id in self.waiting else None

    def job(self, job_id: str) -> Job:
        with self.lock:
            if job_id not in self.jobs:
                raise RequestError(f"no job {job_id!r} (finished jobs are kept for the last {KEEP_JOBS})", 404)
            return self.jobs[job_id]
