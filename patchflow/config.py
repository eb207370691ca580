"""Run configuration: dataclass sections read from TOML, overridable with `--set section.key=value`.

Every key is checked before any work starts: unknown keys, wrong types and impossible values are
rejected with the key and the allowed values named.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
import tomli_w

from patchflow.checks import ConfigError, build_section, check_type, choice, key_name, positive, show
from patchflow.codecs.autoencoder import AutoencoderConfig
from patchflow.codecs.config import CodecConfig
from patchflow.data.config import WORLDS, DataConfig
from patchflow.flow.config import FlowConfig, samplers_for
from patchflow.kinds import ARCHS, RunKind, run_kind
from patchflow.models.dit import DiTConfig
from patchflow.models.text_config import MMDiTConfig, VideoDiTConfig
from patchflow.distill.config import DistillConfig
from patchflow.lora.config import LoRAConfig
from patchflow.repa.config import RepaConfig
from patchflow.text.config import TextConfig

__all__ = ["ARCHS", "CodecConfig", "ConfigError", "DataConfig", "DistillConfig", "FlowConfig", "MAX_SAMPLES", "PRESET_DIR",
           "LoRAConfig", "RepaConfig", "RunConfig", "RunKind", "SampleConfig", "SECTIONS", "TextConfig", "TrainConfig", "WORLDS", "from_dict",
           "load_config", "model_config_class", "parse_override", "resolve_preset", "run_kind"]

PRESET_DIR = Path(__file__).parent / "configs"
MAX_SAMPLES = 1_000_000  # most samples one command or sample.n may ask for


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
    precision: str = "fp32"               # "auto" (bf16 where measured faster, else fp32; the presets), "fp32",
                                          # "bf16" (autocast) or "fp16" (autocast + grad scaler, GPUs)
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
            positive(f"train.{key}", getattr(self, key))
        positive("train.lr", self.lr)
        choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine", "linear"))
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
        choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.peak_tflops < 0:
            raise ConfigError(f"train.peak_tflops must be >= 0 (0 measures the peak once), got {self.peak_tflops}")
        choice("train.parallel", self.parallel, ("ddp", "fsdp"))
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
    precision: str = "fp32"               # "auto" (bf16 where measured faster, else fp32; the presets), "fp32" or
                                          # "bf16" (autocast; about 2.5x faster on CPUs with AVX-512 bf16)
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
        allowed = samplers_for(objective)
        if self.sampler not in allowed:
            raise ConfigError(f"sample.sampler = {show(self.sampler)} is not allowed with flow.objective = "
                              f"{objective!r}; choose one of: {', '.join(map(repr, allowed))}")
        if not 1 <= self.n <= MAX_SAMPLES:
            raise ConfigError(f"sample.n must be in 1..{MAX_SAMPLES}, got {self.n}")
        choice("sample.precision", self.precision, ("auto", "fp32", "bf16"))


@dataclass
class RunConfig:
    model: DiTConfig | MMDiTConfig | AutoencoderConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def kind(self) -> RunKind:
        """What this run is (class, text, video or codec): decided once, in `patchflow.kinds`."""
        return run_kind(self.model.arch)

    @property
    def is_text_run(self) -> bool:
        """A run whose model is conditioned on prompts (text-to-image or text-to-video)."""
        return self.kind.prompts

    @property
    def is_codec_run(self) -> bool:
        """A run that trains an autoencoder (model.arch = "autoencoder") rather than a diffusion model."""
        return self.kind.codec

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
        self.repa.validate()
        self.lora.validate()
        self.distill.validate()
        if self.kind.codec:
            for key, on in (("repa.encoder", self.repa.enabled), ("lora.rank", self.lora.enabled),
                            ("distill.teacher", self.distill.enabled)):
                if on:
                    raise ConfigError(f"{key} is for diffusion models; a codec run (model.arch = \"autoencoder\") "
                                      f"takes no REPA, adapters or teacher: leave it unset")
            return self._validate_codec_run()
        if self.lora.enabled and not self.train.init_from.strip():
            raise ConfigError("lora.rank adapts a trained base model: set train.init_from to its run directory or "
                              "weights file (e.g. --set train.init_from='\"runs/demo\"')")
        if self.lora.quantize_base and self.train.parallel == "fsdp":
            raise ConfigError("lora.quantize_base = \"int8\" keeps the base in int8 tensors, which FSDP cannot shard: "
                              "use train.parallel = \"ddp\" (each process holds the int8 base)")
        self._validate_repa()
        self._validate_distill()
        self.sample.validate(self.flow.objective)
        if self.flow.objective == "rectified" and self.model.learn_sigma:
            raise ConfigError("model.learn_sigma = true needs flow.objective = \"ddpm\" (a flow predicts no variance)")
        if self.flow.objective == "ddpm" and self.flow.num_timesteps < self.sample.steps:
            raise ConfigError(f"sample.steps={self.sample.steps} exceeds flow.num_timesteps={self.flow.num_timesteps}")
        video_only = [k for k, v in (("data.buckets", self.data.buckets), ("data.mix_images", self.data.mix_images),
                                     ("train.pack_tokens", self.train.pack_tokens),
                                     ("flow.context_prob", self.flow.context_prob),
                                     ("flow.frame_noise", self.flow.frame_noise != "independent")) if v]
        if video_only and not self.kind.video:
            raise ConfigError(f"{video_only[0]} is a video setting: it needs model.arch = \"video\" (clips of "
                              f"several sizes, per-frame timesteps); model.arch = {show(self.model.arch)}")
        if self.flow.contrastive and self.train.pack_tokens:
            raise ConfigError("flow.contrastive pushes each prediction from another item's target of the same shape; "
                              "packed clips (train.pack_tokens) have none: set one of them to 0")
        if self.data.mix_images and not (self.data.buckets or self.train.pack_tokens):
            raise ConfigError("data.mix_images adds one-frame clips to multi-frame ones: batches must then be "
                              "bucketed (data.buckets with a one-frame bucket) or packed (train.pack_tokens)")
        captioned = ("color-digits", "moving-digits", "captions")
        if self.kind.prompts and self.data.dataset not in captioned:
            raise ConfigError(f"model.arch = {self.model.arch!r} learns from captions; data.dataset = "
                              f"{show(self.data.dataset)} has none: use one of {', '.join(map(repr, captioned))}")
        if not self.kind.prompts and self.data.dataset == "captions":
            raise ConfigError("data.dataset = \"captions\" gives (image or clip, caption) pairs for a text-conditioned "
                              "model: set model.arch = \"mmdit\" (or \"crossdit\"; \"video\" for clips), or use "
                              "\"folder\" for labels from class subfolders")
        if self.data.dataset in ("folder", "video", "captions", "moving-digits") and self.codec.source == "identity":
            d, m = self.data, self.model  # pixels: the data is the model's input
            frames = (d.frames, f"data.frames = {d.frames}") if d.dataset in ("video", "moving-digits") else \
                (1, f"data.dataset = {show(d.dataset)} gives images, 1 frame each")
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

    def _validate_repa(self) -> None:
        r = self.repa
        if not r.enabled:
            return
        if r.depth > self.model.depth:
            raise ConfigError(f"repa.depth = {r.depth} is beyond the model's {self.model.depth} blocks (model.depth = "
                              f"{self.model.depth}): choose 1..{self.model.depth}")
        for key, value, why in (("train.pack_tokens", self.train.pack_tokens, "packed clips share one sequence"),
                                ("data.mix_images", self.data.mix_images, "the mixed-in images have no features in "
                                                                          "the clips' feature cache")):
            if value:
                raise ConfigError(f"repa.encoder with {key} = {value} is not supported ({why}): set {key} = 0 or "
                                  f"repa.encoder = \"\"")

    def _validate_distill(self) -> None:
        d = self.distill
        if not d.enabled:
            return
        if self.flow.objective == "ddpm" and (d.method == "progressive" or d.steps < 2):
            raise ConfigError("distill.teacher: a DDPM run's student takes DDIM steps on DiT's respaced timesteps, "
                              "which keep timestep 0 alone for one step and do not nest from round to round: use "
                              "distill.method = \"trajectory\" with distill.steps >= 2")
        if self.train.pack_tokens:
            raise ConfigError("distill.teacher with train.pack_tokens: a student trains on dense batches; set "
                              "train.pack_tokens = 0")
        if self.lora.enabled and d.method == "progressive":
            raise ConfigError("distill.method = \"progressive\" makes each round's student the next teacher, which a "
                              "LoRA student (lora.rank) is not on its own: use distill.method = \"trajectory\"")
        if not self.train.init_from.strip():
            raise ConfigError("distill.teacher: a student starts from its teacher's weights: set train.init_from to "
                              "the teacher's run directory (`patchflow distill RUN` does)")

    def _validate_codec_run(self) -> "RunConfig":
        from patchflow.data import pixel_shape

        if self.codec.source != "identity":
            raise ConfigError(f"codec.source = {show(self.codec.source)}: a codec run (model.arch = "
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
                              f"{show(d.dataset)} gives {channels}-channel images")
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


def model_config_class(arch):
    """[model]'s dataclass for model.arch, by the run's kind."""
    kind = run_kind(arch)
    if kind.codec:
        return AutoencoderConfig
    if kind.video:
        return VideoDiTConfig
    return MMDiTConfig if kind.prompts else DiTConfig


def _build_section(name: str, cls, values: dict):
    """A section from its TOML table; [model]'s class is chosen by its arch, and a DiT preset fills in its sizes
    (once the table's keys are known to be [model]'s)."""
    if name == "model" and isinstance(values, dict):
        cls = model_config_class(values.get("arch", "dit"))
        known = {f.name for f in dataclasses.fields(cls)}
        if cls is DiTConfig and values.get("preset") and set(values) <= known:
            check_type("model.preset", values["preset"], str)
            try:
                values = {**DiTConfig.preset_fields(values["preset"]), **values}
            except ValueError as e:
                raise ConfigError(f"model.preset: {e}") from None
    return build_section(name, cls, values)


SECTIONS = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}
SECTIONS["model"] = DiTConfig  # or AutoencoderConfig, by model.arch (model_config_class)


def from_dict(data: dict) -> RunConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{key_name(unknown[0])}]; sections are: {', '.join(SECTIONS)}")
    return RunConfig(**{name: _build_section(name, cls, data.get(name, {})) for name, cls in SECTIONS.items()}).validate()


def parse_override(item: str) -> tuple[list[str], object]:
    """'train.steps=2000' -> (['train', 'steps'], 2000). Values are TOML literals; bare words are strings."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {show(item)}")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set key must look like section.key (e.g. train.steps), got {show(key)}")
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
    raise ConfigError(f"config file {show(str(path))} not found (shipped presets: {names})")


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
    return from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """--set section.key=value items into a config's TOML tables (in place; returned)."""
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in --set {show(item)}; sections are: {', '.join(SECTIONS)}")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {show(table)}")
        table[key] = value
    return data
