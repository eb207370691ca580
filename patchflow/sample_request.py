"""One check of a sample request against a run, from its config alone (before any model loads), shared by the
CLI (`patchflow sample`, `eval`), `Pipeline` and the server.

Each caller spells its inputs its own way (`--label`, `labels=`, `label`), so a `Spelling` says how, and every
message names what the user typed. A `RequestError` carries the HTTP status the server answers with.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from patchflow.flow.config import samplers_for


class RequestError(ValueError):
    """A request a run cannot serve as asked: `status` (4xx, for the HTTP API) and a message saying what to change."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Spelling:
    """How one caller names each input, and how it asks for labels or prompts."""
    labels: str
    labels_usage: str
    prompt: str
    prompt_usage: str
    negative: str
    frames: str
    first_frame: str
    extend: str
    video: str
    strength: str
    sampler: str
    init_image: str
    mask: str


CLI = Spelling("--label", "--label K (with --n) or --labels-all N", "--prompt",
               "--prompt TEXT (with --n) or --prompts-file FILE", "--negative-prompt", "--frames", "--first-frame",
               "--extend", "--video-to-video", "--strength", "--sampler", "--init-image", "--mask")
PYTHON = Spelling("labels=", "labels= (an int class or a list of classes)", "prompt=",
                  "prompt= (a string, sampled n times, or a list of prompts)", "negative_prompt=", "frames=",
                  "first_frame=", "extend=", "video=", "strength=", "sampler=", "init_image=", "mask=")
API = Spelling("label", "label", "prompt", "prompt", "negative_prompt", "frames", "first_frame", "extend", "video",
               "strength", "sampler", "init_image", "mask")


def check_request(cfg, say: Spelling, where: str, *, labels=None, prompts=None, negative=None, frames=None,
                  first_frame=None, extend=None, video=None, strength=None, sampler=None, init_image=None,
                  mask=None, steps=None, example: str | None = None) -> None:
    """Raise RequestError when run `cfg` (a RunConfig; `where` names it) cannot sample this request.

    labels: a list of class numbers (class runs); prompts: a list of prompts (text and video runs); negative: a
    negative prompt; frames, first_frame, extend, video: video inputs; init_image, mask, strength: an edit's inputs
    (None = not given); sampler: a sampler name or None; steps: sampling steps or None (Pipeline passes them:
    every caller samples through it, so the warning below comes once); example: a prompt to suggest when none is
    given. A distilled student asked for other steps than it was trained for samples with a warning (its steps are
    fitted to its teacher's; others are off what it learned).
    """
    kind = cfg.kind
    if kind.codec:
        raise RequestError(f"{where} is a codec run: it encodes and decodes, it does not sample; score it with "
                           f"`patchflow eval {where}` or use patchflow.codecs.load({where!r})")
    if kind.labels:
        _check_labels(cfg, say, where, labels, prompts, negative)
    else:
        _check_prompts(kind, say, where, labels, prompts, example)
    _check_video(cfg, say, where, frames=frames, first_frame=first_frame, extend=extend, video=video)
    _check_edit(cfg, say, where, init_image, video, mask, strength)
    allowed = samplers_for(cfg.flow.objective)
    if sampler is not None and sampler not in allowed:
        raise RequestError(f"{say.sampler} {sampler!r} is not allowed for a {cfg.flow.objective} run; choose one "
                           f"of: {', '.join(map(repr, allowed))}", 422)
    trained = cfg.distill.steps
    if cfg.distill.enabled and steps is not None and steps != trained:
        warnings.warn(f"{where} is a student distilled for {trained} sampling step{'s' * (trained > 1)}; "
                      f"{steps} steps are off what it learned (quality drops): sample it in {trained}",
                      UserWarning, stacklevel=2)


def _check_labels(cfg, say: Spelling, where: str, labels, prompts, negative) -> None:
    n = cfg.model.num_classes
    for flag, value in ((say.prompt, prompts), (say.negative, negative)):
        if value is not None:
            raise RequestError(f"{flag} is for text-to-image runs; {where} is class-conditional ({n} classes): send "
                               f"{say.labels_usage} instead")
    if labels is None:
        raise RequestError(f"{say.labels} is required: {where} is class-conditional (classes 0..{n - 1}); say what "
                           f"to sample: {say.labels_usage}")
    bad = [int(y) for y in labels if not 0 <= int(y) < n]
    if bad:
        raise RequestError(f"{say.labels} {bad[0]} is out of range: this model has classes 0..{n - 1}", 422)


def _check_prompts(kind, say: Spelling, where: str, labels, prompts, example) -> None:
    if labels is not None:
        raise RequestError(f"{say.labels} is for class-conditional runs; {where} is {kind.what}: send "
                           f"{say.prompt_usage}")
    if prompts is None:
        eg = f", e.g. {example!r}" if example else ""
        raise RequestError(f"{say.prompt} is empty; say what to sample: {say.prompt_usage}{eg}")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise RequestError(f"{say.prompt} is empty: prompts must be non-empty text, got {p!r} (for an "
                               f"unconditional sample use guidance 1 with any prompt)")


def _check_video(cfg, say: Spelling, where: str, **given) -> None:
    used = {k: v for k, v in given.items() if v is not None}
    flag = {k: getattr(say, k) for k in given}
    if not cfg.kind.video:
        if used:
            k = next(iter(used))
            makes = "images" if cfg.model.frames == 1 else "clips with no given frames"
            raise RequestError(f"{flag[k]}: {where} makes {makes}; {flag[k]} is for video runs (model.arch = "
                               f"\"video\")")
        return
    sources = [k for k in ("first_frame", "extend", "video") if k in used]
    if len(sources) > 1:
        raise RequestError(f"give one of {say.first_frame}, {say.extend} and {say.video}, not "
                           f"{' and '.join(flag[k] for k in sources)}")
    if "frames" in used and not (int(used["frames"]) == used["frames"] and 1 <= used["frames"] <= 1024):
        raise RequestError(f"{say.frames} must be a whole number in 1..1024, got {used['frames']!r}", 422)
    if "frames" in used and "video" in used:
        raise RequestError(f"{say.frames} does not go with {say.video}: the clip's own length is kept")
    held = [k for k in sources if k != "video"]  # SDEdit of a clip works in diffusion runs too
    if held and cfg.flow.objective != "rectified":
        raise RequestError(f"{flag[held[0]]}: {where} cannot hold given frames (a rectified-flow run can)")


def _check_edit(cfg, say: Spelling, where: str, init_image, video, mask, strength) -> None:
    """An edit: an image to start from (image runs) or a clip (video runs), a mask and a strength with either."""
    if init_image is not None and cfg.kind.video:
        raise RequestError(f"{say.init_image}: {where} makes clips; edit a clip with {say.video}, or animate a still "
                           f"with {say.first_frame}")
    if init_image is not None and cfg.model.frames > 1:
        raise RequestError(f"{say.init_image}: {where} makes {cfg.model.frames}-frame clips, not images")
    source = say.video if cfg.kind.video else say.init_image
    given = init_image is not None or video is not None
    if mask is not None and not given:
        raise RequestError(f"{say.mask} needs the {'clip' if cfg.kind.video else 'image'} it masks: give {source} "
                           f"too (white in the mask = redraw)")
    if strength is not None and not given:
        raise RequestError(f"{say.strength} goes with {source} (how much of the input is redrawn)")
    if strength is not None and not (isinstance(strength, (int, float)) and 0 <= strength <= 1):
        raise RequestError(f"{say.strength} must be in [0, 1] (0 keeps the input, 1 redraws it all), got "
                           f"{strength!r}", 422)
