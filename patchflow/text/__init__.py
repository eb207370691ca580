"""Frozen text encoders behind one interface, for text-conditioned models.

    encoder = load_text_encoder("minilm")                       # the default: all-MiniLM-L6-v2, D = P = 384
    encoder = load_text_encoder("/models/sd3/text_encoder")      # a CLIP or T5 folder, kind from config.json
    encoder = load_text_encoder("clip_l_dir,clip_g_dir,t5_dir")  # joined SD3's way (or a list of specs)
    emb = encoder.encode(["a red circle", ""], drop=draw_dropout(encoder.num_encoders, 2, 0.1, generator))
    emb.tokens (B, L, D) float32, emb.mask (B, L) bool, emb.pooled (B, P) float32

`TextEmbeddingCache(directory, encoder)` stores embeddings on disk so training encodes each caption once.
"""
from __future__ import annotations

from pathlib import Path

from patchflow.text.base import FrozenTextEncoder, TextEmbedding, TextEncoderError, draw_dropout
from patchflow.text.cache import TextCacheError, TextEmbeddingCache
from patchflow.text.chars import CharacterEncoder
from patchflow.text.hf import CLIPTextEncoder, T5TextEncoder, load_transformers_encoder
from patchflow.text.joint import JointTextEncoder
from patchflow.text.minilm import MiniLMEncoder

DEFAULT_SPEC = "minilm"

__all__ = ["CharacterEncoder", "CLIPTextEncoder", "FrozenTextEncoder", "JointTextEncoder", "MiniLMEncoder", "T5TextEncoder",
           "TextCacheError", "TextEmbedding", "TextEmbeddingCache", "TextEncoderError", "draw_dropout",
           "load_text_encoder", "parse_spec"]


def parse_spec(spec) -> list[str]:
    """A spec (str, comma-separated str, or list of str) -> the list of single-encoder specs."""
    if isinstance(spec, (str, Path)):
        parts = str(spec).split(",")
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, (str, Path)) for s in spec):
        parts = [str(s) for s in spec]
    else:
        raise TextEncoderError(f"a text encoder spec is \"minilm\", a directory, or a list / comma-separated "
                               f"string of those; got {type(spec).__name__} {spec!r}")
    parts = [p.strip() for p in parts]
    if not parts or any(not p for p in parts):
        raise TextEncoderError(f"text encoder spec {spec!r} has an empty entry; give \"minilm\", a directory, or "
                               f"several of them separated by commas")
    return parts


def _load_one(spec: str, max_length: int | None, fit: bool, padding: str) -> FrozenTextEncoder:
    if spec == DEFAULT_SPEC:
        return MiniLMEncoder(max_length=max_length, fit_max_length=fit, padding=padding)
    if spec == "chars":
        return CharacterEncoder(max_length=max_length, fit_max_length=fit)
    directory = Path(spec).expanduser()
    if not directory.exists():
        if len(directory.parts) > 1 or spec.startswith((".", "~")):  # meant as a path
            raise TextEncoderError(f"text encoder directory {directory} does not exist; give a folder written by "
                                   f"save_pretrained (a CLIP / T5 / sentence-transformers model) or \"{DEFAULT_SPEC}\"")
        raise TextEncoderError(f"unknown text encoder {spec!r}: it is not \"{DEFAULT_SPEC}\" or \"chars\" and no such "
                               f"directory exists; give \"{DEFAULT_SPEC}\", \"chars\" (joined after another: "
                               f"\"minilm,chars\") or a CLIP / T5 / sentence-transformers folder")
    if (directory / "modules.json").is_file():  # a sentence-transformers folder (mean pooling)
        return MiniLMEncoder(directory, max_length=max_length, fit_max_length=fit, padding=padding)
    return load_transformers_encoder(directory, max_length=max_length, fit_max_length=fit, padding=padding)


def load_text_encoder(spec="minilm", max_length: int | None = None, padding: str = "longest"):
    """A frozen text encoder from `spec`:
      "minilm"                 the installed all-MiniLM-L6-v2 (default max_length 32)
      "chars"                  the prompt's glyph text, one token per character (patchflow.text.chars), joined
                               after another encoder: "minilm,chars"
      a directory              a CLIP text model (max_length 77), a T5 encoder (256), or a sentence-transformers
                               mean-pooling folder; the kind is read from config.json / modules.json
      "a,b,c" or [a, b, c]     a JointTextEncoder of those, joined SD3's way (use the list for paths with commas)
    max_length None keeps each encoder's default; a number applies to each encoder (in a joint encoder lowered to
    an encoder's position limit, e.g. CLIP's 77; alone, more than the limit is an error). padding "longest" pads
    a batch to its longest prompt and masks the padding; "max_length" (CLIP, T5) pads every prompt to max_length
    and the padding is read, as SD3's pipelines do (for converted SD3 checkpoints)."""
    parts = parse_spec(spec)
    if len(parts) == 1:
        return _load_one(parts[0], max_length, fit=False, padding=padding)
    return JointTextEncoder([_load_one(p, max_length, fit=True, padding=padding) for p in parts])
