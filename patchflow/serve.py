"""`patchflow serve`: a local web studio and an HTTP API over one or more runs (class, text-to-image, video).

One worker thread owns the models and samples one request at a time (a model already uses every core); requests
wait in a bounded queue, so two users at once both get their results, in order. Every sample is drawn on its own
(n = 1, seed = seed + k), so the settings shown beside it reproduce it exactly with `patchflow sample`.

Routes (JSON errors everywhere: {"error": message}; 4xx for a request's fault, the server keeps serving):
- GET  /                          the studio page
- GET  /api/runs                  the runs served and what each takes (waits until they are loaded)
- POST /api/generate              JSON body -> image/png (an image) or image/gif (a clip); n > 1: one grid
- POST /api/jobs                  the same body -> 202 {"id", "queue_position"} (the page's route: it shows progress)
- GET  /api/jobs/{id}             status, queue position, progress (steps done / total), items with their settings
- GET  /api/jobs/{id}/items/{k}   sample k of a finished job
- GET  /api/health                {"ok": true, "loaded": ..., "queued": ...}
"""
from __future__ import annotations

import base64
import binascii
import collections
import io
import itertools
import queue
import re
import shlex
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:
    raise ImportError("patchflow serve needs FastAPI and uvicorn: pip install 'patchflow[serve]' (or pip install "
                      "fastapi uvicorn)") from None

MAX_N = 8                 # samples per request
MAX_STEPS = 250
MAX_GUIDANCE = 30.0
MAX_FRAMES = 64
MAX_SIDE = 512            # pixels, either side
MAX_UPLOAD = 8 * 2**20    # bytes of a first frame, decoded
MAX_BODY = 12 * 2**20     # bytes of a request body (the first frame in base64, and the rest)
KEEP_JOBS = 256           # finished jobs whose results stay fetchable
WAIT_S = 900              # /api/generate gives up (504) after this long


class RequestError(ValueError):
    """A request the server cannot serve as asked: `status` (4xx) and a message saying what to change."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class ServedRun:
    """A loaded run and what the page and the API offer for it."""
    name: str
    path: Path
    pipe: object  # patchflow.pipeline.Pipeline
    example: str | None = None  # a caption of its data, shown as the prompt box's placeholder
    class_names: list[str] | None = None  # a class run on class folders: label -> folder name (classes.json)

    @property
    def kind(self) -> str:
        return "video" if self.pipe.is_video else "text" if self.pipe.cfg.is_text_run else "class"

    @property
    def size_step(self) -> int:
        """Pixels per token side: sizes must be multiples of it."""
        m = self.pipe.cfg.model
        return m.patch_size * (self.pipe.pixel_size(None)[0] // m.input_size)

    @property
    def takes_first_frame(self) -> bool:
        return self.pipe.is_video and self.pipe.cfg.flow.objective == "rectified"  # given frames need a flow

    def info(self) -> dict:
        cfg, pipe = self.pipe.cfg, self.pipe
        h, w = pipe.pixel_size(None)
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "arch": cfg.model.arch,
                "steps": cfg.sample.steps, "guidance": cfg.sample.guidance, "sampler": cfg.sample.sampler,
                "height": h, "width": w, "size_step": self.size_step, "sizes": self.kind != "class",
                "frames": pipe.pixel_frames() if pipe.is_video else None, "first_frame": self.takes_first_frame,
                "example": self.example,
                "num_classes": None if cfg.is_text_run else cfg.model.num_classes, "class_names": self.class_names,
                "limits": {"n": MAX_N, "steps": MAX_STEPS, "guidance": MAX_GUIDANCE, "frames": MAX_FRAMES,
                           "side": MAX_SIDE}}


def run_names(paths: list[Path]) -> list[str]:
    """Short unique names: the folder name, or more of the path where two runs share it."""
    short = [p.name or str(p) for p in paths]
    names = [n if short.count(n) == 1 else "/".join(p.parts[-2:]) for n, p in zip(short, paths)]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def check_runs(runs: list[str | Path]) -> list[Path]:
    """The run directories, checked before anything loads: each exists and holds a sampling run."""
    from patchflow.pipeline import load_run_config

    if not runs:
        raise ValueError("give at least one run directory: patchflow serve RUN [RUN ...]")
    paths = [Path(r).expanduser() for r in runs]
    for p in paths:
        cfg = load_run_config(p)  # FileNotFoundError naming config.toml when p is not a run
        if cfg.is_codec_run:
            raise ValueError(f"{p} is a codec run: it encodes and decodes, it does not sample; serve a model run")
    if len(set(p.resolve() for p in paths)) < len(paths):
        raise ValueError("a run is given twice")
    return paths


# ---------------------------------------------------------------------------------------------- requests


class GenerateRequest(BaseModel):
    """The JSON body of /api/generate and /api/jobs (types and ranges checked before any work)."""
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored
    run: str | None = Field(None, description="run name (GET /api/runs); default the first run")
    prompt: str | None = Field(None, max_length=2000, description="text runs")
    negative_prompt: str | None = Field(None, max_length=2000, description="text runs: steer away from this")
    label: int | None = Field(None, ge=0, description="class runs: the class to draw")
    n: int = Field(1, ge=1, le=MAX_N, description="samples, seeds seed .. seed + n - 1")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="default the run's sample.steps")
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, description="1 = no guidance")
    sampler: str | None = Field(None, description="euler | heun (flows), ddpm | ddim (diffusion)")
    seed: int = Field(0, ge=0, le=2**31 - 1 - MAX_N)
    frames: int | None = Field(None, ge=1, le=MAX_FRAMES, description="video runs: frames per clip")
    height: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels (text and video runs)")
    width: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels (text and video runs)")
    first_frame: str | None = Field(None, description="video runs: a still to animate, base64 (or a data: URL) of "
                                                      "a PNG/JPEG/WebP/GIF image")


def decode_image(data: str) -> np.ndarray:
    """base64 or a data: URL of an image file -> uint8 (H, W, 3); RequestError saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise RequestError("first_frame: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("first_frame is not valid base64; send the image file's bytes base64-encoded") from None
    if len(raw) > MAX_UPLOAD:
        raise RequestError(f"first_frame is {len(raw) / 2**20:.1f} MiB; at most {MAX_UPLOAD // 2**20} MiB", 413)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.width * im.height > 4096 * 4096:
                raise RequestError(f"first_frame is {im.width}x{im.height} pixels; at most 4096x4096", 413)
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise RequestError(f"first_frame is not an image ({len(raw)} bytes that no image format reads); send a PNG, "
                           f"JPEG, WebP or GIF file") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:  # a cut or corrupt image file
        raise RequestError(f"first_frame: the image cannot be decoded ({e}); send a whole PNG, JPEG, WebP or GIF "
                           f"file") from None


def resolve(req, runs: dict[str, ServedRun]) -> tuple[ServedRun, dict]:
    """A validated request -> its run and the Pipeline keyword arguments, checked against that run."""
    if req.run is None:
        run = next(iter(runs.values()))
    elif req.run in runs:
        run = runs[req.run]
    else:
        raise RequestError(f"no run {req.run!r}; this server has {', '.join(map(repr, runs))}", 404)
    cfg, pipe, kind = run.pipe.cfg, run.pipe, run.kind
    kw: dict = {"steps": req.steps, "guidance": req.guidance, "sampler": req.sampler}
    if kind == "class":
        for key in ("prompt", "negative_prompt"):
            if getattr(req, key) is not None:
                raise RequestError(f"{key}: run {run.name!r} is class-conditional; send label (0.."
                                   f"{cfg.model.num_classes - 1}) instead")
        if req.label is None:
            raise RequestError(f"label is required for the class-conditional run {run.name!r} (0.."
                               f"{cfg.model.num_classes - 1})")
        if req.label >= cfg.model.num_classes:
            raise RequestError(f"label {req.label} is out of range: run {run.name!r} has classes 0.."
                               f"{cfg.model.num_classes - 1}", 422)
        kw["labels"] = req.label
    else:
        if req.label is not None:
            raise RequestError(f"label: run {run.name!r} takes text; send prompt instead")
        if req.prompt is None or not req.prompt.strip():
            example = f", e.g. {run.example!r}" if run.example else ""
            raise RequestError(f"prompt is empty; run {run.name!r} needs a text prompt{example}")
        kw["prompt"] = req.prompt.strip()
        if req.negative_prompt is not None and req.negative_prompt.strip():
            kw["negative_prompt"] = req.negative_prompt.strip()
    if req.sampler is not None:
        allowed = ("euler", "heun") if cfg.flow.objective == "rectified" else ("ddpm", "ddim")
        if req.sampler not in allowed:
            raise RequestError(f"sampler {req.sampler!r}: run {run.name!r} takes {' or '.join(allowed)}", 422)
    if (req.height is None) != (req.width is None):
        raise RequestError("give both height and width, or neither (the training size)")
    if req.height is not None:
        h, w = pipe.pixel_size(None)
        if kind == "class" and (req.height, req.width) != (h, w):
            raise RequestError(f"size: run {run.name!r} is class-conditional and draws {h}x{w} only", 422)
        step = run.size_step
        if req.height % step or req.width % step:
            raise RequestError(f"size {req.height}x{req.width}: run {run.name!r} needs multiples of {step} pixels",
                               422)
        kw["size"] = (req.height, req.width)
    if not pipe.is_video:
        for key in ("frames", "first_frame"):
            if getattr(req, key) is not None:
                raise RequestError(f"{key}: run {run.name!r} makes images; {key} is for video runs")
        return run, kw
    if req.frames is not None:
        try:
            pipe.latent_frames(req.frames)
        except ValueError as e:
            raise RequestError(str(e), 422) from None
        kw["frames"] = req.frames
    if req.first_frame is not None:
        if not run.takes_first_frame:
            raise RequestError(f"first_frame: run {run.name!r} cannot hold given frames (a rectified-flow run can)")
        kw["first_frame"] = decode_image(req.first_frame)
    return run, kw


def example_prompt(cfg) -> str | None:
    """A caption of the run's data (a held-out one for the built-in worlds); None for class runs or when the
    data is not where the run was trained."""
    from patchflow.pipeline import preview_prompts

    if not cfg.is_text_run:
        return None
    try:
        return preview_prompts(cfg, 1)[0]
    except (ValueError, OSError, KeyError, IndexError):
        return None


def class_names(run_dir: Path) -> list[str] | None:
    """The class folder names a class run trained on (RUN/classes.json), or None (a built-in world, or a file
    that is not a list of names: the page then shows numbers)."""
    import json

    try:
        names = json.loads((run_dir / "classes.json").read_text())
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def reproduce_command(run: ServedRun, kw: dict, seed: int) -> str:
    """The `patchflow sample` line that draws this very sample."""
    parts = ["patchflow", "sample", str(run.path)]
    if "labels" in kw:
        parts += ["--label", str(kw["labels"])]
    else:
        parts += ["--prompt", kw["prompt"]]
        if "negative_prompt" in kw:
            parts += ["--negative-prompt", kw["negative_prompt"]]
    parts += ["--n", "1", "--seed", str(seed)]
    for key in ("steps", "guidance", "sampler"):
        parts += [f"--{key}", str(kw[key])]
    if "size" in kw:
        parts += ["--size", f"{kw['size'][0]}x{kw['size'][1]}"]
    if "frames" in kw:
        parts += ["--frames", str(kw["frames"])]
    if "first_frame" in kw:
        parts += ["--first-frame", "still.png"]
    parts += ["--out", "sample.gif" if run.pipe.is_video else "sample.png"]
    return shlex.join(parts)


# ---------------------------------------------------------------------------------------------- jobs


def encode(sample: np.ndarray) -> tuple[bytes, str]:
    """An image (H, W, C) -> PNG bytes, a clip (T, H, W, 3) -> GIF bytes; with the media type."""
    from PIL import Image

    from patchflow.clip_files import gif_bytes

    if sample.ndim == 4:
        return gif_bytes(sample), "image/gif"
    buffer = io.BytesIO()
    Image.fromarray(sample[..., 0] if sample.shape[-1] == 1 else sample).save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


@dataclass
class Job:
    id: str
    run: ServedRun
    kw: dict
    n: int
    seed: int
    status: str = "queued"      # queued | running | done | error
    done_steps: int = 0
    total_steps: int = 0
    samples: list = field(default_factory=list)   # uint8 arrays, one per seed
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
        if self.run.pipe.is_video:
            s["frames"] = kw.get("frames") or self.run.pipe.pixel_frames()
            s["first_frame"] = "first_frame" in kw
        s["command"] = reproduce_command(self.run, kw, self.seed + k)
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

    def __init__(self, runs: list[str | Path], device: str = "auto", max_queue: int = 32, use_ema: bool = True):
        self.paths = check_runs(runs)
        self.names = run_names(self.paths)
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
            for name, path in zip(self.names, self.paths):
                pipe = Pipeline.load(path, ema=self.use_ema, device=self.device)
                self.runs[name] = ServedRun(name, path, pipe, example_prompt(pipe.cfg), class_names(path))
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
            except (ValueError, RequestError) as e:  # the request's fault, found while sampling
                job.error, job.status = (getattr(e, "status", 400), str(e)), "error"
            except Exception as e:  # noqa: BLE001 -- a bug must not kill the worker: report it and go on
                traceback.print_exc()
                job.error, job.status = (500, f"sampling failed: {type(e).__name__}: {e}"), "error"
            finally:
                job.finished.set()
                self._forget_old()

    def _sample(self, job: Job) -> None:
        for k in range(job.n):
            def progress(done: int, total: int, k: int = k) -> None:  # total: one sample's sampling steps
                job.total_steps, job.done_steps = job.n * total, k * total + done

            with warnings.catch_warnings():  # a resized first frame warns; the settings beside it say the size
                warnings.simplefilter("ignore", UserWarning)
                sample = job.run.pipe(**job.kw, n=1, seed=job.seed + k, progress=progress)[0]
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
        run, kw = resolve(req, self.runs)
        s = run.pipe.cfg.sample
        kw = {**kw, "steps": kw["steps"] or s.steps, "guidance": s.guidance if kw["guidance"] is None
              else kw["guidance"], "sampler": kw["sampler"] or s.sampler}
        job = Job(id=f"{next(self.ids)}-{int(time.time() * 1000) % 100000}", run=run, kw=kw, n=req.n, seed=req.seed,
                  total_steps=req.n * kw["steps"])
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


# ---------------------------------------------------------------------------------------------- the app


def grid_bytes(samples: list[np.ndarray]) -> tuple[bytes, str]:
    """Several samples as one PNG (images) or GIF (clips) grid, as `patchflow sample` draws them."""
    from patchflow.pipeline import grid

    x = np.stack(samples)
    nrow = min(len(samples), 4)
    if x.ndim == 5:  # clips: a grid per frame
        return encode(np.stack([grid(x[:, t], nrow=nrow) for t in range(x.shape[1])]))
    return encode(grid(x, nrow=nrow))


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one sentence per field: `steps: Input should be less than or equal to 250`."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (see GET /api/runs and the README for the fields)"
        elif e.get("type") == "json_invalid":
            where, msg = "body", f"not valid JSON ({e.get('ctx', {}).get('error', msg)})"
        elif e.get("type") == "model_attributes_type":
            msg = "the body must be a JSON object"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a JSON 413 before the app reads it, whether its
    Content-Length says so or a chunked body grows past the limit (read up to it, then refused)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.limit:
            return await self._refuse(scope, receive, send, f"{int(size) / 2**20:.1f} MiB")
        chunks, total = [], 0
        while True:  # buffer the body (at most `limit` bytes), then hand it on in one message
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._refuse(scope, receive, send, f"over {self.limit / 2**20:.1f} MiB")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        from fastapi.responses import JSONResponse

        error = (f"the request body is {size}; at most {self.limit // 2**20} MiB (a first frame of up to "
                 f"{MAX_UPLOAD // 2**20} MiB, base64)")
        await JSONResponse({"error": error}, status_code=413)(scope, receive, send)


class TokenGate:
    """ASGI middleware: with a token, every /api/ request must carry it, as `Authorization: Bearer TOKEN` (scripts)
    or the cookie that opening /?token=TOKEN sets (the page, whose images are plain <img> requests); else a JSON
    401 that says how. The page itself and /api/health stay open (no samples, no runs named)."""

    COOKIE = "patchflow_token"

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _offered(self, scope) -> dict[str, bool]:
        """Whether the header, the cookie and the query string each carry the token."""
        import hmac
        from http.cookies import CookieError, SimpleCookie
        from urllib.parse import parse_qs

        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"")
        try:
            cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:  # a malformed Cookie header carries no token
            cookie = SimpleCookie()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        offered = {"header": bearer[7:].strip() if bearer[:7].lower() == b"bearer " else b"",
                   "cookie": cookie[self.COOKIE].value.encode() if self.COOKIE in cookie else b"",
                   "query": query.encode()}
        return {k: hmac.compare_digest(v, self.token) for k, v in offered.items()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse, Response

        path, offered = scope["path"], self._offered(scope)
        if path == "/" and offered["query"]:  # remember it for the page's own requests; drop it from the address
            cookie = f"{self.COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict"
            return await Response(status_code=303, headers={"Location": "/", "Set-Cookie": cookie})(
                scope, receive, send)
        if path.startswith("/api/") and path != "/api/health" and not any(offered.values()):
            error = ("this server needs its token (patchflow serve --token): send the header 'Authorization: Bearer "
                     "TOKEN', or open /?token=TOKEN in the browser once")
            return await JSONResponse({"error": error}, status_code=401,
                                      headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(studio: Studio, token: str | None = None):
    """The FastAPI app over a Studio; with a token, the API needs it (TokenGate)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="patchflow", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    page = (Path(__file__).parent / "web" / "studio.html").read_text()

    @app.exception_handler(RequestError)
    def _request_error(request: Request, e: RequestError):
        retry = {"Retry-After": "5"} if e.status == 503 else None  # a full queue or runs still loading
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=retry)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse({"error": validation_message(e.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    def _bug(request: Request, e: Exception):  # a JSON 500 at worst; the process keeps serving
        traceback.print_exception(e)
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)

    app.add_middleware(BodyLimit, limit=MAX_BODY)
    if token:
        app.add_middleware(TokenGate, token=token)  # added last, so it runs first: no body is read without it

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/health")
    def health():
        return {"ok": studio.load_error is None, "loaded": studio.loaded.is_set(), "queued": studio.queue.qsize()}

    @app.get("/api/runs")
    def runs():
        return {"runs": studio.runs_info()}

    def media(data: bytes, media_type: str, settings: dict) -> Response:
        import json

        return Response(data, media_type=media_type,
                        headers={"X-Patchflow-Seed": str(settings["seed"]),
                                 "X-Patchflow-Settings": json.dumps({k: v for k, v in settings.items()
                                                                     if k != "command"})})

    @app.post("/api/generate")
    def generate(req: GenerateRequest):
        job = studio.submit(req)
        if not job.finished.wait(timeout=WAIT_S):
            raise RequestError(f"still queued or sampling after {WAIT_S} s; poll GET /api/jobs/{job.id}", 504)
        if job.error:
            raise RequestError(job.error[1], job.error[0])
        if job.n == 1:
            return media(*job.items[0])
        data, media_type = grid_bytes(job.samples)
        return media(data, media_type, job.items[0][2])

    @app.post("/api/jobs", status_code=202)
    def submit(req: GenerateRequest):
        job = studio.submit(req)
        return job.state(studio.position(job))

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: str):
        job = studio.job(job_id)
        return job.state(studio.position(job))

    @app.get("/api/jobs/{job_id}/items/{k}")
    def item(job_id: str, k: int):
        job = studio.job(job_id)
        if job.status != "done":
            raise RequestError(f"job {job_id} is {job.status}; its samples come when it is done", 409)
        if not 0 <= k < len(job.items):
            raise RequestError(f"job {job_id} has items 0..{len(job.items) - 1}", 404)
        return media(*job.items[k])

    return app


def check_port(host: str, port: int) -> None:
    """Fail early, with a message, when the address is taken (uvicorn would only log it and exit)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None


def serve(runs: list[str | Path], host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          max_queue: int = 32, use_ema: bool = True, token: str | None = None) -> None:
    """Serve the studio until interrupted (Ctrl-C). token: the API needs it (TokenGate); None or "" = open."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("patchflow serve needs FastAPI and uvicorn: pip install 'patchflow[serve]' "
                          "(or pip install fastapi uvicorn)") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {max_queue}")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,}", token):
        raise ValueError("--token must be at least 8 characters of A-Z a-z 0-9 . _ ~ - (it travels in a URL and a "
                         "cookie); e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"serving on {host} without --token: anyone who reaches port {port} can sample the runs",
                      stacklevel=2)
    check_port(host, port)
    t0 = time.perf_counter()
    studio = Studio(runs, device=device, max_queue=max_queue, use_ema=use_ema)
    app = build_app(studio, token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    page = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"patchflow serve: {len(studio.paths)} run(s) ({', '.join(studio.names)}); the studio at {page} , the API "
          f"at http://{shown}:{port}/api/generate" + (" (Authorization: Bearer TOKEN)" if token else ""), flush=True)

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

    def ready() -> None:  # say when the models are in memory: the first request is then served at once
        studio.loaded.wait()
        if studio.load_error is None:
            print(f"patchflow serve: ready ({time.perf_counter() - t0:.1f} s after start)", flush=True)
        else:  # a run that cannot load (missing weights, a codec gone): stop, rather than serve 503s
            server.should_exit = True

    threading.Thread(target=ready, daemon=True).start()
    server.run()
    if studio.load_error is not None:
        raise ValueError(studio.load_error)
