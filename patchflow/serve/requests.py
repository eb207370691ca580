"""What one request may ask: the JSON body (`GenerateRequest`, types and ranges), a first frame decoded, the body
checked against its run (`resolve`: the shared `sample_request.check_request`, then what only HTTP asks), and the
`patchflow sample` line that draws the same sample again."""
from __future__ import annotations

import base64
import binascii
import io
import shlex
from typing import TYPE_CHECKING

import numpy as np

from patchflow.flow.config import samplers_for
from patchflow.sample_request import API, RequestError, check_request

INSTALL = "patchflow serve needs FastAPI and uvicorn: pip install 'patchflow[serve]' (or pip install fastapi uvicorn)"

try:
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:
    raise ImportError(INSTALL) from None

if TYPE_CHECKING:
    from patchflow.serve.runs import ServedRun

MAX_N = 8                 # samples per request
MAX_STEPS = 250
MAX_GUIDANCE = 30.0
MAX_FRAMES = 64
MAX_SIDE = 512            # pixels, either side
MAX_UPLOAD = 8 * 2**20    # bytes of a first frame, decoded
MAX_LORA_SCALE = 4.0
LIMITS = {"n": MAX_N, "steps": MAX_STEPS, "guidance": MAX_GUIDANCE, "frames": MAX_FRAMES, "side": MAX_SIDE,
          "lora_scale": MAX_LORA_SCALE}
SAMPLERS = f"{' | '.join(samplers_for('rectified'))} (flows), {' | '.join(samplers_for('ddpm'))} (diffusion)"


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
    sampler: str | None = Field(None, description=SAMPLERS)
    seed: int = Field(0, ge=0, le=2**31 - 1 - MAX_N)
    frames: int | None = Field(None, ge=1, le=MAX_FRAMES, description="video runs: frames per clip")
    height: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels (text and video runs)")
    width: int | None = Field(None, ge=1, le=MAX_SIDE, description="pixels (text and video runs)")
    first_frame: str | None = Field(None, description="video runs: a still to animate, base64 (or a data: URL) of "
                                                      "a PNG/JPEG/WebP/GIF image")
    init_image: str | None = Field(None, description="image runs: an image to edit (image-to-image), base64 (or a "
                                                     "data: URL) of a PNG/JPEG/WebP/GIF image")
    mask: str | None = Field(None, description="with init_image: redraw only the white part (inpainting), an image "
                                               "like init_image; resized to it with a warning")
    strength: float | None = Field(None, ge=0, le=1, description="with init_image: how much is redrawn (0 keeps the "
                                                                 "input; default 0.7, 1 with a mask)")
    lora: str | None = Field(None, description="an adapter the server was started with (patchflow serve --lora; "
                                               "GET /api/runs lists each run's)")
    lora_scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="the adapter's strength")


def decode_image(data: str, field: str = "first_frame") -> np.ndarray:
    """base64 or a data: URL of an image file -> uint8 (H, W, 3); RequestError naming `field`, saying what is
    wrong."""
    from PIL import Image, UnidentifiedImageError

    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise RequestError(f"{field}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64; send the image file's bytes base64-encoded") from None
    if len(raw) > MAX_UPLOAD:
        raise RequestError(f"{field} is {len(raw) / 2**20:.1f} MiB; at most {MAX_UPLOAD // 2**20} MiB", 413)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.width * im.height > 4096 * 4096:
                raise RequestError(f"{field} is {im.width}x{im.height} pixels; at most 4096x4096", 413)
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise RequestError(f"{field} is not an image ({len(raw)} bytes that no image format reads); send a PNG, "
                           f"JPEG, WebP or GIF file") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:  # a cut or corrupt image file
        raise RequestError(f"{field}: the image cannot be decoded ({e}); send a whole PNG, JPEG, WebP or GIF "
                           f"file") from None


def resolve(req: GenerateRequest, runs: dict[str, ServedRun]) -> tuple[ServedRun, dict, tuple]:
    """A validated request -> its run, the Pipeline keyword arguments and the (adapter, scale) to merge in, checked
    against that run: what any caller may ask by `check_request`, then the run's size, frame count and adapters,
    and the first frame decoded."""
    if req.run is None:
        run = next(iter(runs.values()))
    elif req.run in runs:
        run = runs[req.run]
    else:
        raise RequestError(f"no run {req.run!r}; this server has {', '.join(map(repr, runs))}", 404)
    pipe = run.pipe
    kind = pipe.cfg.kind
    check_request(pipe.cfg, API, f"run {run.name!r}", labels=None if req.label is None else [req.label],
                  prompts=None if req.prompt is None else [req.prompt], negative=req.negative_prompt,
                  frames=req.frames, first_frame=req.first_frame, sampler=req.sampler, example=run.example,
                  init_image=req.init_image, mask=req.mask, strength=req.strength)
    kw: dict = {"steps": req.steps, "guidance": req.guidance, "sampler": req.sampler}
    if kind.labels:
        kw["labels"] = req.label
    else:
        kw["prompt"] = req.prompt.strip()
        if req.negative_prompt is not None and req.negative_prompt.strip():
            kw["negative_prompt"] = req.negative_prompt.strip()
    if (req.height is None) != (req.width is None):
        raise RequestError("give both height and width, or neither (the training size)")
    if req.height is not None:
        h, w = pipe.pixel_size(None)
        if kind.labels and (req.height, req.width) != (h, w):
            raise RequestError(f"size: run {run.name!r} is class-conditional and draws {h}x{w} only", 422)
        step = run.size_step
        if req.height % step or req.width % step:
            raise RequestError(f"size {req.height}x{req.width}: run {run.name!r} needs multiples of {step} pixels",
                               422)
        kw["size"] = (req.height, req.width)
    if req.frames is not None:  # a video run (check_request): the count its codec and tubelets take
        try:
            pipe.latent_frames(req.frames)
        except ValueError as e:
            raise RequestError(str(e), 422) from None
        kw["frames"] = req.frames
    for field in ("first_frame", "init_image", "mask"):
        if getattr(req, field) is not None:
            kw[field] = decode_image(getattr(req, field), field)
    if req.strength is not None:
        kw["strength"] = req.strength
    if req.lora is not None and req.lora not in run.loras:
        have = ", ".join(map(repr, sorted(run.loras))) or "none (start the server with --lora [NAME=]ADAPTER)"
        raise RequestError(f"lora: run {run.name!r} has no adapter {req.lora!r}; its adapters: {have}", 422)
    return run, kw, (req.lora, req.lora_scale)


def reproduce_command(run: ServedRun, kw: dict, seed: int, lora: tuple = (None, 1.0)) -> str:
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
    for key, flag, name in (("first_frame", "--first-frame", "still.png"), ("init_image", "--init-image", "input.png"),
                            ("mask", "--mask", "mask.png"), ("strength", "--strength", None)):
        if key in kw:
            parts += [flag, name or f"{kw[key]:g}"]
    if lora[0] is not None:
        parts += ["--lora", f"{run.loras[lora[0]][0]}:{lora[1]:g}"]
    parts += ["--out", "sample.gif" if run.pipe.cfg.kind.video else "sample.png"]
    return shlex.join(parts)
