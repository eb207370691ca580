"""An on-disk cache of text embeddings, so training encodes each caption once instead of every step.

`TextEmbeddingCache(directory, encoder)` follows the encoder interface (`encode(texts, drop=None)`, dim, ...) and
returns what the encoder returns: the stored rows are the encoder's own outputs, kept in float32 (bitwise exact;
`dtype=torch.bfloat16` halves the size and rounds them). Each row is trimmed to its prompt's real tokens, so a
caption costs n_tokens x D x 4 bytes + P x 4 (MiniLM, 14 tokens: 14 x 384 x 4 + 384 x 4 = 23 KiB).

Layout: one folder per encoder identity (a joint encoder keeps one per part, so a CLIP shared by two joint
encoders is stored once); an encoder with other weights, config, tokenizer or max_length gets its own folder:
  <directory>/<name>-<identity[:20]>[-bf16]/
    index.json                   format, format_version, the full identity, name, dim, pooled_dim, max_length, dtype
    shard-<random>.safetensors   keys (n, 32) uint8 = sha256(text), lengths (n,) int64, tokens (sum n_i, D),
                                 pooled (n, P); metadata: the identity
Every file is written to a temporary name, synced and renamed, so a killed process leaves complete files (and at
most a stray `.shard-*.tmp`, ignored, safe to delete). Shards are never rewritten: several processes may add to a
cache at once. Opening is lazy: the first lookup reads the keys of every shard (32 bytes per caption); rows are
read from memory-mapped shards on demand and kept in an in-memory LRU (`memory_bytes`), so repeated captions cost
nothing. New rows are buffered and written every `shard_texts` texts, by `flush()` / `close()` and at the end of
`precompute()`; rows not yet written are simply encoded again by a later run.

Dropout (`drop`) and the empty prompt "" always use the encoder's solo encoding of "" (`encoder.encode([""])`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from patchflow.text.base import TextEmbedding, check_drop, check_texts

FORMAT = "patchflow-text-cache"
FORMAT_VERSION = 1
SHARD_TEXTS = 4096  # texts per shard file
MEMORY_BYTES = 256 << 20  # default in-memory LRU size
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

Row = tuple[torch.Tensor, torch.Tensor]  # (tokens (n, D), pooled (P,)) of one prompt, on the CPU


class TextCacheError(ValueError):
    """A text-embedding cache that cannot be used; the message says why and what to do."""


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path), fsync, rename to `path`: readers see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _LRU:
    """Rows by key, least recently used dropped first once they hold more than `capacity` bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.size, self.items = capacity, 0, OrderedDict()

    def get(self, key):
        row = self.items.get(key)
        if row is not None:
            self.items.move_to_end(key)
        return row

    def put(self, key, row: Row) -> None:
        if key in self.items:
            return
        self.items[key] = row
        self.size += row[0].nbytes + row[1].nbytes
        while self.size > self.capacity and self.items:
            _, (t, p) = self.items.popitem(last=False)
            self.size -= t.nbytes + p.nbytes


class _Store:
    """One encoder's rows in its own folder: the shards on disk and the rows not yet written."""

    def __init__(self, root: Path, encoder, dtype: torch.dtype, shard_texts: int):
        self.encoder, self.dtype, self.shard_texts = encoder, dtype, shard_texts
        self.identity = encoder.identity()
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name).strip("._") or "encoder"
        suffix = "" if dtype == torch.float32 else "-bf16"
        self.folder = root / f"{safe[:40]}-{self.identity[:20]}{suffix}"
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "identity": self.identity,
                     "name": encoder.name, "dim": encoder.dim, "pooled_dim": encoder.pooled_dim,
                     "max_length": encoder.max_length, "dtype": DTYPES[dtype]}
        self.index: dict[bytes, tuple[int, int]] = {}  # key -> (shard, row)
        self.shards: list[tuple[object, list[int]]] = []  # (open shard, token offsets)
        self.seen: set[str] = set()
        self.pending: dict[bytes, Row] = {}
        self._check_folder()

    def _check_folder(self) -> None:
        path = self.folder / "index.json"
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise TextCacheError(f"{path} is unreadable ({e}); delete {self.folder} (it is rebuilt)") from None
            if meta != self.meta:
                diff = sorted(k for k in self.meta if meta.get(k) != self.meta[k]) if isinstance(meta, dict) else []
                raise TextCacheError(f"text cache {self.folder} was made by another encoder or format "
                                     f"({', '.join(diff) or 'index.json'} differ); delete the folder to rebuild it")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(self.meta, indent=2) + "\n"))

    def refresh(self) -> None:
        """Index the shards written since the last look (by this or another process)."""
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path.name in self.seen:
                continue
            try:
                handle = safe_open(str(path), framework="pt")
                keys, lengths = handle.get_tensor("keys"), handle.get_tensor("lengths").tolist()
                identity = (handle.metadata() or {}).get("identity")
            except Exception as e:  # safetensors raises its own error types for a damaged file
                raise TextCacheError(f"text cache shard {path} is unreadable ({e}); delete it (its texts are "
                                     f"encoded again)") from None
            if identity != self.identity:
                raise TextCacheError(f"text cache shard {path} belongs to another encoder; delete it")
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            shard = len(self.shards)
            self.shards.append((handle, offsets))
            for row, key in enumerate(keys.numpy()):
                self.index.setdefault(key.tobytes(), (shard, row))
            self.seen.add(path.name)

    def get(self, key: bytes) -> Row | None:
        if key in self.pending:
            return self.pending[key]
        where = self.index.get(key)
        if where is None:
            return None
        handle, offsets = self.shards[where[0]]
        r = where[1]
        return handle.get_slice("tokens")[offsets[r]:offsets[r + 1]], handle.get_slice("pooled")[r:r + 1][0]

    def add(self, key: bytes, row: Row) -> None:
        self.pending[key] = row
        if len(self.pending) >= self.shard_texts:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one new shard."""
        if not self.pending:
            return
        keys = list(self.pending)
        rows = [self.pending[k] for k in keys]
        tensors = {"keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 32),
                   "lengths": torch.tensor([t.shape[0] for t, _ in rows], dtype=torch.int64),
                   "tokens": torch.cat([t for t, _ in rows]).contiguous(),
                   "pooled": torch.stack([p for _, p in rows]).contiguous()}
        path = self.folder / f"shard-{secrets.token_hex(8)}.safetensors"
        _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT,
                                                                              "identity": self.identity}))
        self.pending.clear()
        self.refresh()


class TextEmbeddingCache:
    """encoder (single or joint) behind an on-disk embedding cache in `directory` (see the module doc).

    dtype: torch.float32 (exact, default) or torch.bfloat16 (half the size, rounded); memory_bytes: in-memory LRU
    size; shard_texts: texts per shard file."""

    def __init__(self, directory: str | Path, encoder, dtype: torch.dtype = torch.float32,
                 memory_bytes: int = MEMORY_BYTES, shard_texts: int = SHARD_TEXTS):
        if dtype not in DTYPES:
            raise TextCacheError(f"text cache dtype must be torch.float32 (exact) or torch.bfloat16, got {dtype}")
        if shard_texts < 1:
            raise TextCacheError(f"shard_texts must be >= 1, got {shard_texts}")
        self.directory, self.encoder = Path(directory).expanduser(), encoder
        self.stores = [_Store(self.directory, e, dtype, shard_texts) for e in encoder.encoders]
        self.memory = _LRU(memory_bytes)
        self._indexed = False

    # the encoder interface, passed through
    dim = property(lambda self: self.encoder.dim)
    pooled_dim = property(lambda self: self.encoder.pooled_dim)
    max_length = property(lambda self: self.encoder.max_length)
    name = property(lambda self: self.encoder.name)
    num_encoders = property(lambda self: self.encoder.num_encoders)
    encoders = property(lambda self: self.encoder.encoders)
    device = property(lambda self: self.encoder.device)

    def identity(self) -> str:
        return self.encoder.identity()

    def join(self, parts: list[TextEmbedding]) -> TextEmbedding:
        return self.encoder.join(parts)

    def to(self, device) -> TextEmbeddingCache:
        self.encoder.to(device)
        return self

    @property
    def folders(self) -> list[Path]:
        """The per-encoder folders this cache reads and writes."""
        return [s.folder for s in self.stores]

    def _index(self) -> None:
        if not self._indexed:  # lazy: nothing is read until the first lookup
            for store in self.stores:
                store.refresh()
            self._indexed = True

    def _lookup(self, i: int, texts) -> tuple[dict[str, Row], list[str]]:
        found, missing = {}, []
        for text in texts:
            row = self.memory.get((i, text))
            if row is None:
                row = self.stores[i].get(text_key(text))
                if row is not None:
                    self.memory.put((i, text), row)
            if row is None:
                missing.append(text)
            else:
                found[text] = row
        return found, missing

    def _encode_into(self, i: int, texts: list[str]) -> dict[str, Row]:
        """Encode `texts` (one batch) with encoder i, store and return their rows; "" is encoded on its own."""
        encoder, store = self.encoders[i], self.stores[i]
        rows = {}
        if "" in texts:
            rows[""] = encoder.encode([""]).rows()[0]
        others = [t for t in texts if t != ""]
        if others:
            rows.update(zip(others, encoder.encode(others).rows()))
        for text, (t, p) in rows.items():
            row = (t.detach().to("cpu", store.dtype, copy=True), p.detach().to("cpu", store.dtype, copy=True))
            store.add(text_key(text), row)
            self.memory.put((i, text), row)
            rows[text] = row
        return rows

    def _rows(self, i: int, texts: list[str]) -> list[Row]:
        unique = list(dict.fromkeys(texts))
        found, missing = self._lookup(i, unique)
        if missing:  # another process may have written them since we looked
            self.stores[i].refresh()
            more, missing = self._lookup(i, missing)
            found.update(more)
        if missing:
            found.update(self._encode_into(i, missing))
        return [found[t] for t in texts]

    def encode(self, texts: list[str], drop: torch.Tensor | None = None) -> TextEmbedding:
        """texts (B) -> TextEmbedding as the encoder gives it; drop (num_encoders, B) bool: encoder i uses the
        empty prompt for sample b where drop[i, b]. Only texts not stored yet are encoded."""
        texts = check_texts(texts)
        drop = check_drop(drop, self.num_encoders, len(texts))
        self._index()
        parts = []
        for i, encoder in enumerate(self.encoders):
            wanted = texts if drop is None else ["" if d else t for t, d in zip(texts, drop[i].tolist())]
            rows = self._rows(i, wanted)
            parts.append(TextEmbedding.from_rows(rows, encoder.dim, encoder.pooled_dim).to(self.device))
        return self.join(parts)

    def precompute(self, texts, batch_size: int = 256, progress: bool = True) -> int:
        """Encode and store every text not stored yet (and the empty prompt), in batches of similar length.
        Returns how many (encoder, text) rows were encoded."""
        if batch_size < 1:
            raise TextCacheError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(dict.fromkeys(check_texts(texts) + [""]))
        self._index()
        todo = []
        for i, store in enumerate(self.stores):
            store.refresh()
            missing = [t for t in texts if store.get(text_key(t)) is None]
            todo.append(sorted(missing, key=len))  # similar lengths share a batch: little padding
        total = sum(map(len, todo))
        bar = None
        if progress and total:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=f"encoding captions ({self.name})", unit="text", dynamic_ncols=True)
        try:
            for i, missing in enumerate(todo):
                for start in range(0, len(missing), batch_size):
                    batch = missing[start:start + batch_size]
                    self._encode_into(i, batch)
                    if bar is not None:
                        bar.update(len(batch))
                self.stores[i].flush()
        finally:
            if bar is not None:
                bar.close()
        return total

    def flush(self) -> None:
        """Write the rows encoded since the last write."""
        for store in self.stores:
            store.flush()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> TextEmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TextEmbeddingCache({str(self.directory)!r}, {self.name!r})"
