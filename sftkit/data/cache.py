"""On-disk cache of tokenized splits, keyed by everything that changes the tokens.

The key hashes the rows themselves (content, not file names or dates), the tokenizer
(its full serialized form), the chat template and its variables, and the processing
settings. A stale cache therefore cannot be reused across tokenizers (Axolotl #1265).

An entry is a directory of flat binary arrays (token ids, loss mask, example ends, task
index, truncation flag per split) plus `meta.json` (sizes and a sha256 per array), written
while tokenizing and renamed into place when complete. Training memory-maps the arrays:
their pages are file-backed, so the data's size does not count against the process's
anonymous memory.

An entry is checked before it is trusted (the threat is corruption and bugs, not an
attacker: a cache directory others can write to is a trust decision): file sizes on every
open; checksums and bounds (ids within the vocabulary, offsets, task indexes, the trained
token count) once per node, by the first process to open it (under a per-node lock), which
then records the files' (size, mtime, inode) in `verified.<host>.json` for the other ranks
and later runs. A damaged entry is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import marshal
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sftkit.data.types import ExampleSet, Source
from sftkit.log.progress import Progress

if TYPE_CHECKING:
    from sftkit.data.processor import ProcessorSettings

FORMAT_VERSION = 4  # 3: memory-mapped arrays, per-source boundaries; 4: checksums
ARRAYS = {"ids": np.int32, "mask": np.uint8, "ends": np.int64, "task": np.int32,
          "truncated": np.uint8}  # fmt: skip
COUNTS = ("rows", "dropped_overlong", "dropped_untrainable", "dropped_oversize",
          "masked_overlong", "truncated", "span_fallbacks", "offset_fallbacks")  # fmt: skip
# A temp entry whose files have not changed for this long is abandoned even when its owner
# cannot be checked (another host, or a reused pid): builds write their files continuously.
STALE_TMP_S = 24 * 3600


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
        self.digests = {name: hashlib.sha256() for name in ARRAYS}
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
            data = np.ascontiguousarray(array, dtype=ARRAYS[name])
            data.tofile(self.files[name])
            self.digests[name].update(data.data)
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
            "sha256": {name: h.hexdigest() for name, h in self.digests.items()},
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
    """A private directory to write an entry into; `publish` moves it into place. Its name
    holds the owner (`.<key>.<pid>.<host>.<random>.tmp`) so abandoned ones can be removed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = f".{key}.{os.getpid()}.{socket.gethostname()}."
    return Path(tempfile.mkdtemp(dir=cache_dir, prefix=prefix, suffix=".tmp"))


def remove_abandoned(cache_dir: Path, now: float | None = None) -> list[Path]:
    """Remove temp entries of killed builds: this host's whose pid is gone, and any whose
    files have not changed for `STALE_TMP_S`. A live build's (any host) is never touched."""
    removed = []
    for tmp in cache_dir.glob(".*.tmp"):
        parts = tmp.name[1:-4].split(".")
        host = ".".join(parts[2:-1]) if len(parts) >= 4 else None
        pid = int(parts[1]) if len(parts) >= 4 and parts[1].isdigit() else None
        gone = host == socket.gethostname() and pid is not None and not pid_alive(pid)
        if gone or _idle_seconds(tmp, now) > STALE_TMP_S:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (the run lock's and the data cache's
    evidence that a holder or a build is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _idle_seconds(directory: Path, now: float | None) -> float:
    try:
        stamps = [directory.stat().st_mtime] + [p.stat().st_mtime for p in directory.iterdir()]
    except OSError:  # removed meanwhile (published or cleaned by another process)
        return 0.0
    return (time.time() if now is None else now) - max(stamps)


@contextlib.contextmanager
def node_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Held while one process of this node checks or builds entry `key`; the other ranks
    wait and then find it checked. POSIX record locks: not inherited by forked workers."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f".{key}.{socket.gethostname()}.lock"
    with open(path, "a+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def entry_problem(
    directory: Path,
    meta: dict[str, Any],
    splits: tuple[str, ...],
    vocab_size: int,
    progress: bool = False,
) -> str | None:
    """Why entry `directory` cannot be trusted, or None. Sizes are checked on every call;
    checksums and bounds once per node and file state (see the module docstring);
    `progress`: report the checksum pass (`Progress`)."""
    state: dict[str, list[int]] = {}
    for split in splits:
        info = meta.get(split)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), dict):
            return f"meta.json has no checksums for split {split!r}"
        for name, dtype in ARRAYS.items():
            path = directory / f"{split}.{name}.bin"
            count = info["tokens"] if name in ("ids", "mask") else info["examples"]
            expected = int(count) * np.dtype(dtype).itemsize
            try:
                st = path.stat()
            except OSError:
                return f"{path} is missing"
            if st.st_size != expected:
                return f"{path} has {st.st_size} bytes, expected {expected} (truncated or grown)"
            state[path.name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    marker = directory / f"verified.{socket.gethostname()}.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == state:
            return None
    size = sum(st[0] for st in state.values())
    with Progress("checking the data cache", size, "B", enabled=progress) as bar:
        for split in splits:
            problem = _checksum_problem(directory, split, meta[split], bar) or _bounds_problem(
                open_split(directory, split, meta[split]), meta[split], split, vocab_size
            )
            if problem:
                return problem
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    with contextlib.suppress(OSError):  # a read-only cache is checked again next time
        tmp.write_text(json.dumps(state))
        os.replace(tmp, marker)
    return None


def _checksum_problem(
    directory: Path, split: str, info: dict[str, Any], bar: Progress
) -> str | None:
    for name in ARRAYS:
        path = directory / f"{split}.{name}.bin"
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
                bar.update(len(block))
        if h.hexdigest() != info["sha256"].get(name):
            return f"{path} does not match its checksum in meta.json (changed after it was written)"
    return None


def _bounds_problem(s: ExampleSet, info: dict[str, Any], split: str, vocab: int) -> str | None:
    """Indexes that would otherwise end in IndexError tracebacks at step 1, and a trained
    token count that differs from the one the report shows."""
    tokens, examples = int(info["tokens"]), int(info["examples"])
    if tokens and (int(s.ids.min()) < 0 or int(s.ids.max()) >= vocab):
        return f"{split}.ids.bin holds token ids outside the tokenizer's vocabulary [0, {vocab})"
    if tokens and int(s.mask.max()) > 1:
        return f"{split}.mask.bin holds values other than 0 and 1"
    if int(s.mask.sum(dtype=np.int64)) != int(info["trained_tokens"]):
        return f"{split}.mask.bin trains a different token count than meta.json records"
    if examples and (
        int(s.ends[-1]) != tokens or int(s.ends[0]) < 0 or bool((np.diff(s.ends) < 0).any())
    ):
        return f"{split}.ends.bin holds example offsets that are not increasing up to {tokens}"
    if examples and (int(s.task.min()) < 0 or int(s.task.max()) >= len(s.task_names)):
        return f"{split}.task.bin holds task indexes outside [0, {len(s.task_names)})"
    if examples and int(s.truncated_flags.max()) > 1:
        return f"{split}.truncated.bin holds values other than 0 and 1"
    if any(not 0 <= src.start <= src.stop <= examples for src in s.sources):
        return f"meta.json's {split} sources lie outside [0, {examples}]"
    return None


def discard(directory: Path) -> None:
    """Move a damaged entry out of the way (ranks still mapping it keep their pages)."""
    aside = directory.with_name(f".{directory.name}.{os.getpid()}.{socket.gethostname()}.x.tmp")
    with contextlib.suppress(OSError):
        os.rename(directory, aside)
        shutil.rmtree(aside, ignore_errors=True)


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
