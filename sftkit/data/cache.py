"""On-disk cache of tokenized splits, keyed by everything that changes the tokens.

The key hashes the rows themselves (content, not file names or dates), the tokenizer
(its full serialized form), the chat template and its variables, and the processing
settings. A stale cache therefore cannot be reused across tokenizers (Axolotl #1265).

An entry is a directory of flat binary arrays (token ids, loss mask, example ends, task
index, truncation flag per split) plus `meta.json`, written while tokenizing and renamed
into place when complete. Training memory-maps the arrays: their pages are file-backed,
so the data's size does not count against the process's anonymous memory.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sftkit.data.types import ExampleSet, Source

if TYPE_CHECKING:
    from sftkit.data.processor import ProcessorSettings

FORMAT_VERSION = 3  # 3: memory-mapped arrays, per-source boundaries
ARRAYS = {"ids": np.int32, "mask": np.uint8, "ends": np.int64, "task": np.int32,
          "truncated": np.uint8}  # fmt: skip
COUNTS = ("rows", "dropped_overlong", "dropped_untrainable", "dropped_oversize",
          "masked_overlong", "truncated", "span_fallbacks", "offset_fallbacks")  # fmt: skip


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


def key_hasher(tokenizer: Any, settings: ProcessorSettings) -> Any:
    """A sha256 started with the tokenizer, template and settings; rows are added to it."""
    h = hashlib.sha256(f"sftkit-data-v{FORMAT_VERSION}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps(asdict(settings), sort_keys=True, default=str).encode())
    return h


def rows_digest(items: list[tuple[dict[str, Any], str]]) -> bytes:
    """Hash of the rows' content.

    `marshal` format 2 (no object sharing, so equal content gives equal bytes) serializes
    plain JSON-like rows about 5x faster than `json.dumps`; rows holding anything else
    (dates, numpy scalars) are hashed through JSON.
    """
    try:
        return b"m" + hashlib.sha256(marshal.dumps(items, 2)).digest()
    except ValueError:  # an object marshal cannot write (or nesting marshal refuses)
        h = hashlib.sha256(b"j")
        for row, task in items:
            h.update(task.encode())
            h.update(json.dumps(row, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
        return h.digest()


class SplitWriter:
    """Appends one split's tokenized chunks to flat files as they arrive.

    Files are `<split>.<array>.bin` (raw little-endian arrays, dtypes in `ARRAYS`);
    `close` returns the split's metadata (sizes, task names, sources, counts).
    """

    def __init__(self, directory: Path, split: str) -> None:
        self.files = {
            name: open(directory / f"{split}.{name}.bin", "wb")  # noqa: SIM115 (closed in close)
            for name in ARRAYS
        }
        self.tokens = self.examples = self.trained = 0
        self.task_index: dict[str, int] = {}
        self.sources: list[list[Any]] = []
        self.counts = dict.fromkeys(COUNTS, 0)
        self.oversize: list[str] = []  # where the first row over data.max_row_chars was
        # rows per token length before the length policy: bounded by the longest row, not
        # by the row count, and enough for the exact 99th percentile at close
        self.length_counts = np.zeros(0, dtype=np.int64)
        self._source_start = 0

    def add(self, result: Any, tasks: list[str]) -> None:
        """One `BatchResult` and the task name of each of its rows."""
        kept = result.drops == 0
        lengths = result.lengths[kept]
        task = np.asarray(
            [self.task_index.setdefault(t, len(self.task_index)) for t in tasks], dtype=np.int32
        )[kept]
        arrays = {
            "ids": result.ids,
            "mask": result.mask,
            "ends": self.tokens + np.cumsum(lengths, dtype=np.int64),
            "task": task,
            "truncated": result.truncated[kept],
        }
        for name, array in arrays.items():
            np.ascontiguousarray(array, dtype=ARRAYS[name]).tofile(self.files[name])
        self.tokens += int(lengths.sum())
        self.examples += int(kept.sum())
        self.trained += int(result.mask.sum())
        drops = result.drops
        for key, value in {
            "rows": len(drops),
            "dropped_overlong": int((drops == 1).sum()),
            "dropped_untrainable": int((drops == 2).sum()),
            "dropped_oversize": int((drops == 3).sum()),
            "masked_overlong": int(result.masked.sum()),
            "truncated": int(result.truncated[kept].sum()),
            **result.paths,
        }.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
        self.oversize = self.oversize or list(result.oversize)
        if result.full_lengths is not None:
            full = result.full_lengths[result.full_lengths >= 0]
            counts = np.bincount(full, minlength=len(self.length_counts))
            counts[: len(self.length_counts)] += self.length_counts
            self.length_counts = counts

    def length_p99(self) -> int:
        """The smallest length at which at least 99% of the tokenized rows fit (0: none)."""
        total = int(self.length_counts.sum())
        if not total:
            return 0
        cumulative = np.cumsum(self.length_counts)
        return int(np.searchsorted(cumulative, -(-99 * total // 100)))

    def end_source(self, name: str) -> None:
        self.sources.append([name, self._source_start, self.examples])
        self._source_start = self.examples

    def close(self) -> dict[str, Any]:
        for f in self.files.values():
            f.close()
        return {
            "tokens": self.tokens,
            "examples": self.examples,
            "trained_tokens": self.trained,
            "names": list(self.task_index),
            "sources": self.sources,
            "counts": {**self.counts, "length_p99": self.length_p99()},
            "oversize": self.oversize,
        }


def open_split(directory: Path, split: str, meta: dict[str, Any]) -> ExampleSet:
    """A split of a cache entry, memory-mapped read-only (pages are file-backed)."""
    sizes = {"ids": meta["tokens"], "mask": meta["tokens"]}
    arrays = {}
    for name, dtype in ARRAYS.items():
        n = sizes.get(name, meta["examples"])
        path = directory / f"{split}.{name}.bin"
        # a zero-length file cannot be mapped
        arrays[name] = (
            np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
        )
    sources = [Source(str(name), int(a), int(b)) for name, a, b in meta["sources"]]
    return ExampleSet(
        arrays["ids"], arrays["mask"], arrays["ends"], arrays["task"], arrays["truncated"],
        list(meta["names"]), sources,
    )  # fmt: skip


def read_meta(directory: Path) -> dict[str, Any] | None:
    """A complete entry's metadata, or None (absent, unreadable or of another format)."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION else None


def new_entry(cache_dir: Path, key: str) -> Path:
    """A private directory to write an entry into; `publish` moves it into place."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}.", suffix=".tmp"))


def publish(tmp: Path, final: Path, meta: dict[str, Any]) -> Path:
    """Write the metadata last and rename: a crash leaves the old entry or none.

    When another process (another rank) published the same key first, its entry wins.
    """
    (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT_VERSION}))
    if read_meta(final) is None and final.exists():
        shutil.rmtree(final, ignore_errors=True)  # an incomplete or old-format entry
    try:
        os.rename(tmp, final)
    except OSError:  # published meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return final
