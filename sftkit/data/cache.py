"""On-disk cache of tokenized splits, keyed by everything that changes the tokens.

The key hashes the rows themselves (content, not file names or dates), the tokenizer
(its full serialized form), the chat template and its variables, and the processing
settings. A stale cache therefore cannot be reused across tokenizers (Axolotl #1265).
Entries are `.npz` files written atomically and read with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 2  # 2: int32 ids, marshal row hashing
SPLIT_ARRAYS = ("ids", "mask", "lengths", "task", "truncated")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFTKIT_HOME", Path.home() / ".cache" / "sftkit")) / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary, merges, added tokens and special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode()
    )
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def cache_key(
    splits: dict[str, list[tuple[dict[str, Any], str]]], tokenizer: Any, settings: Any
) -> str:
    """Key over rows (with task names), tokenizer, template and settings."""
    h = hashlib.sha256(f"sftkit-data-v{FORMAT_VERSION}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(asdict(settings), sort_keys=True, default=str).encode())
    for split in sorted(splits):
        h.update(f"\0split:{split}\0".encode())
        h.update(rows_digest(splits[split]))
    return h.hexdigest()[:32]


def rows_digest(items: list[tuple[dict[str, Any], str]]) -> bytes:
    """Hash of the rows' content.

    `marshal` format 2 (no object sharing, so equal content gives equal bytes) serializes
    plain JSON-like rows about 5x faster than `json.dumps`; rows holding anything else
    (dates, numpy scalars) are hashed through JSON.
    """
    try:
        return b"m" + hashlib.sha256(marshal.dumps(items, 2)).digest()
    except ValueError:  # an object marshal cannot write
        h = hashlib.sha256(b"j")
        for row, task in items:
            h.update(task.encode())
            h.update(json.dumps(row, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
        return h.digest()


def save(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the old entry or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = dict(arrays)
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays and metadata, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "meta"}
            meta = json.loads(bytes(data["meta"]).decode())
    except (OSError, ValueError, KeyError):
        return None
    return arrays, meta
