"""CLIP and T5 text encoders loaded from a local transformers folder (the `save_pretrained` layout: config.json,
model.safetensors, tokenizer files), frozen, never downloading.

- CLIP (config model_type "clip_text_model", or "clip" for a full CLIPModel folder, whose text half is used):
  `CLIPTextModelWithProjection`; tokens = the penultimate hidden layer (B, L, hidden) as SD3 takes them,
  pooled = the projected `text_embeds` (B, projection_dim).
- T5 (model_type "t5"): `T5EncoderModel`; tokens = the last hidden state (B, L, d_model), no pooled vector (P = 0).

`TransformersTextEncoder` holds what they share (and MiniLM reuses): tokenizing with right padding to the longest
prompt and one truncation warning per call, zeroed padding, and an identity hashed from the folder's files. With
padding="max_length" (CLIP and T5) every prompt is padded to max_length and the padding is read, not masked, as SD3's
pipelines encode prompts. A diffusers pipeline's text_encoder_N folder takes its tokenizer from tokenizer_N.
Weights load in float32 from safetensors only: pickled `.bin` weights are refused (loading a pickle can run code).
"""
from __future__ import annotations

import json
import re
import warnings
from abc import abstractmethod
from pathlib import Path

import torch

from patchflow.text.base import FrozenTextEncoder, TextEmbedding, TextEncoderError
from patchflow.weights import hash_files, safetensors_files

VERSION = 1  # bump when what an encoder computes from the same files changes: caches keyed on identity() renew
CLIP_TYPES = ("clip_text_model", "clip")
T5_TYPES = ("t5",)
T5_DEFAULT_MAX_LENGTH = 256  # SD3's T5 sequence length; T5's relative positions have no hard limit
PADDINGS = ("longest", "max_length")  # to the batch's longest prompt, masked / to max_length, read (SD3's pipelines)
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("spiece.model",), ("vocab.txt",))
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
CONFIG_VOLATILE = ("transformers_version", "_name_or_path")  # not part of what the model computes


def read_config(directory: Path) -> dict:
    """config.json of `directory` as a dict; TextEncoderError when the folder or the file is missing or bad."""
    if not directory.exists():
        raise TextEncoderError(f"text encoder directory {directory} does not exist; give a folder written by "
                               f"save_pretrained (config.json, model.safetensors, tokenizer files) or \"minilm\"")
    if not directory.is_dir():
        raise TextEncoderError(f"text encoder path {directory} is a file; give the folder that holds config.json")
    path = directory / "config.json"
    if not path.is_file():
        raise TextEncoderError(f"{directory} has no config.json; it is not a transformers model folder "
                               f"(save the model there with model.save_pretrained({str(directory)!r}))")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"{path} is not readable JSON ({e}); re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise TextEncoderError(f"{path} does not hold a JSON object; re-save the model with save_pretrained")
    return config


def _tokenizer_set(directory: Path) -> tuple[str, ...] | None:
    return next((names for names in TOKENIZER_SETS if all((directory / n).is_file() for n in names)), None)


def tokenizer_dir(directory: Path) -> Path:
    """Where the tokenizer of the model in `directory` lies: the folder itself, or in a diffusers pipeline the
    sibling tokenizer folder of a text_encoder folder (text_encoder_2 -> tokenizer_2)."""
    sibling = re.fullmatch(r"text_encoder(_\d+)?", directory.name)
    if _tokenizer_set(directory) is None and sibling:
        paired = directory.parent / f"tokenizer{sibling.group(1) or ''}"
        if _tokenizer_set(paired) is not None:
            return paired
    return directory


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files of `directory` (tokenizer_dir); TextEncoderError naming what is missing when none."""
    directory = tokenizer_dir(directory)
    names = _tokenizer_set(directory)
    if names is not None:
        return [directory / n for n in names + TOKENIZER_EXTRAS if (directory / n).is_file()]
    raise TextEncoderError(f"{directory} has no tokenizer files: tokenizer.json is missing (or vocab.json + "
                           f"merges.txt for CLIP, spiece.model for T5). Save the tokenizer next to the model with "
                           f"tokenizer.save_pretrained({str(directory)!r}) (in a diffusers pipeline folder, "
                           f"text_encoder_N reads the tokenizer_N folder beside it)")


def check_directory(directory: Path) -> dict:
    """config.json of a complete model folder; TextEncoderError naming the first missing piece otherwise."""
    config = read_config(directory)
    safetensors_files(directory, TextEncoderError)
    tokenizer_files(directory)
    return config


def resolve_max_length(requested: int | None, default: int, limit: int | None, name: str, fit: bool) -> int:
    """The max_length to use: `requested` or `default`. Above the model's position `limit` it is an error, or it
    is lowered to the limit when `fit` (a joint encoder gives one max_length to encoders of different limits)."""
    length = default if requested is None else int(requested)
    if length < 1:
        raise TextEncoderError(f"max_length must be >= 1 token, got {length}")
    if limit is not None and length > limit:
        if fit or requested is None:
            return limit
        raise TextEncoderError(f"max_length={length} is more than {name} has positions for ({limit}); "
                               f"use max_length <= {limit}")
    return length


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    directory = tokenizer_dir(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TextEncoderError(f"could not load the tokenizer of {directory}: {e}") from None
    tokenizer.padding_side = "right"  # rows keep their real tokens first; masks are prefixes
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked and zeroed, the token is irrelevant
    return tokenizer


def load_model(cls, directory: Path, config=None):
    """cls.from_pretrained on a local folder in float32 from safetensors; every weight must be in the files."""
    try:
        model, info = cls.from_pretrained(str(directory), config=config, local_files_only=True, use_safetensors=True,
                                          dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise TextEncoderError(f"could not load {directory} as a {cls.__name__}: {e}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        names = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise TextEncoderError(f"{directory} lacks {len(missing)} weights a {cls.__name__} needs ({names}); it holds "
                               f"another kind of model")
    return model


class TransformersTextEncoder(FrozenTextEncoder):
    """A frozen transformers model and its tokenizer. Subclasses implement `features(ids, mask)` ->
    (tokens (B, L, D), pooled (B, P)) and set `kind`."""

    kind = "transformers"

    def __init__(self, directory: Path, model, tokenizer, max_length: int, dim: int, pooled_dim: int,
                 name: str | None = None, extra_identity: dict | None = None, padding: str = "longest"):
        super().__init__()
        if padding not in PADDINGS:
            raise TextEncoderError(f"text padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.padding = padding
        self.directory = Path(directory)
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.dim, self.pooled_dim = max_length, dim, pooled_dim
        self.name = name or self.directory.name
        self._config = {k: v for k, v in read_config(self.directory).items() if k not in CONFIG_VOLATILE}
        self._files = safetensors_files(self.directory, TextEncoderError), tokenizer_files(self.directory)
        self._extra_identity = {**(extra_identity or {}), **({"padding": padding} if padding != "longest" else {})}
        self._file_hashes: tuple[str, str] | None = None
        self.freeze()

    @abstractmethod
    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B, L) -> (tokens (B, L, D), pooled (B, P)) from the model."""

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (B) -> ids (B, L) long, mask (B, L) bool; right-padded to the longest, cut at max_length."""
        full = self.tokenizer(texts, truncation=False, verbose=False, return_attention_mask=False)["input_ids"]
        over = [len(ids) - self.max_length for ids in full if len(ids) > self.max_length]
        if over:
            warnings.warn(f"{len(over)} of {len(texts)} prompts are longer than {self.name}'s max_length="
                          f"{self.max_length} tokens: {sum(over)} tokens were cut. Raise max_length ([text] "
                          f"max_length, or load_text_encoder(..., max_length=N)) or shorten the prompts",
                          stacklevel=4)
        batch = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_length,
                               return_tensors="pt", return_token_type_ids=False)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()
        if self.padding == "max_length":  # SD3's pipelines: the padding is read (unmasked), as the model was trained
            mask = torch.ones_like(mask)
        return ids, mask

    def embed(self, texts: list[str]) -> TextEmbedding:
        ids, mask = self.tokenize(texts)
        with torch.no_grad():
            tokens, pooled = self.features(ids, mask)
        tokens = torch.where(mask[..., None], tokens.float(), 0.0)  # padding carries nothing a model could read
        return TextEmbedding(tokens, mask, pooled.float())

    def identity_parts(self) -> dict:
        if self._file_hashes is None:  # hashed once, on first use: reading a large model's files takes seconds
            self._file_hashes = hash_files(self._files[0]), hash_files(self._files[1])
        return {"kind": self.kind, "version": VERSION, "config": self._config, "weights": self._file_hashes[0],
                "tokenizer": self._file_hashes[1], "max_length": self.max_length, **self._extra_identity}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, pooled_dim={self.pooled_dim}, max_length={self.max_length}"


class CLIPTextEncoder(TransformersTextEncoder):
    """CLIP text tower with projection: tokens = penultimate hidden layer, pooled = projected text_embeds."""

    kind = "clip"

    def __init__(self, directory: str | Path, max_length: int | None = None, fit_max_length: bool = False,
                 padding: str = "longest"):
        from transformers import CLIPTextModelWithProjection

        directory = Path(directory).expanduser()
        config = check_directory(directory)
        text_config = None
        if config.get("model_type") == "clip":  # a full CLIPModel folder: take its text half and projection
            from transformers import AutoConfig

            full = AutoConfig.from_pretrained(str(directory), local_files_only=True)
            text_config = full.text_config
            text_config.projection_dim = full.projection_dim
        model = load_model(CLIPTextModelWithProjection, directory, text_config)
        cfg = model.config
        length = resolve_max_length(max_length, cfg.max_position_embeddings, cfg.max_position_embeddings,
                                    directory.name, fit_max_length)
        super().__init__(directory, model, load_tokenizer(directory), length, cfg.hidden_size, cfg.projection_dim,
                         padding=padding)

    def features(self, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class T5TextEncoder(TransformersTextEncoder):
    """T5 encoder: tokens = last hidden state, no pooled vector (pooled is (B, 0))."""

    kind = "t5"

    def __init__(self, directory: str | Path, max_length: int | None = None, fit_max_length: bool = False,
                 padding: str = "longest"):
        from transformers import T5EncoderModel

        directory = Path(directory).expanduser()
        check_directory(directory)
        model = load_model(T5EncoderModel, directory)
        length = resolve_max_length(max_length, T5_DEFAULT_MAX_LENGTH, None, directory.name, fit_max_length)
        super().__init__(directory, model, load_tokenizer(directory), length, model.config.d_model, 0,
                         padding=padding)

    def features(self, ids, mask):
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return tokens, tokens.new_zeros(tokens.shape[0], 0)


def detect_kind(directory: str | Path) -> str:
    """"clip" or "t5" from config.json's model_type; TextEncoderError for anything else."""
    directory = Path(directory).expanduser()
    model_type = read_config(directory).get("model_type")
    if model_type in CLIP_TYPES:
        return "clip"
    if model_type in T5_TYPES:
        return "t5"
    raise TextEncoderError(f"{directory} holds a model of type {model_type!r}; a text encoder directory must hold a "
                           f"CLIP text model (model_type {' or '.join(CLIP_TYPES)}), a T5 encoder (t5), or a "
                           f"sentence-transformers mean-pooling model (with modules.json)")


def load_transformers_encoder(directory: str | Path, max_length: int | None = None, fit_max_length: bool = False,
                              padding: str = "longest") -> TransformersTextEncoder:
    """A CLIP or T5 encoder from `directory`, its kind read from config.json."""
    cls = CLIPTextEncoder if detect_kind(directory) == "clip" else T5TextEncoder
    return cls(directory, max_length=max_length, fit_max_length=fit_max_length, padding=padding)
