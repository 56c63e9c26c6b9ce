"""Read rows from local files or the hub, keeping each row's origin for error messages.

JSON and JSONL are read with the standard library, one line at a time, so a bad line is
reported by number and rows are never schema-unified (Arrow would None-fill missing keys
of heterogeneous tool arguments). Readers are lazy (`Rows`): memory holds a row or an
Arrow record batch, never the whole file. `pyarrow` reads Parquet; `datasets` is imported
only for Arrow files, `save_to_disk` directories and hub ids.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from sftkit.data.errors import DataError

Row = dict[str, Any]
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".gz")
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top level.
SAVED_MARKERS = ("dataset_dict.json", "state.json")
ARROW_BATCH = 1024  # rows per Arrow record batch turned into Python objects


class Rows(Sequence[Row]):
    """Rows read lazily: each pass over them reads the source again, one row at a time.

    Memory holds the row being read, never the file. The NeMo RL protocol's sequence
    operations (`len`, `rows[k]`, `rows[:n]`) work too, each at the cost of a pass.
    """

    def __init__(self, produce: Callable[[], Iterator[Row]]) -> None:
        self._produce = produce
        self._len: int | None = None

    def __iter__(self) -> Iterator[Row]:
        return self._produce()

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(1 for _ in self)
        return self._len

    @overload
    def __getitem__(self, k: int) -> Row: ...
    @overload
    def __getitem__(self, k: slice) -> list[Row]: ...
    def __getitem__(self, k: int | slice) -> Row | list[Row]:
        if isinstance(k, slice):
            if k.start is not None and k.start < 0 or k.stop is not None and k.stop < 0:
                return list(self)[k]
            return list(itertools.islice(self, k.start, k.stop, k.step))
        if k < 0:
            k += len(self)
        for row in itertools.islice(self, k, None):
            return row
        raise IndexError(k)

    def map(self, fn: Callable[[Row], Row]) -> Rows:
        """These rows with `fn` applied to each as it is read."""
        return Rows(lambda: map(fn, self._produce()))


def read_rows(source: str, split: str | None = None, subset: str | None = None) -> Rows:
    """Rows of a local file (.json/.jsonl/.csv/.parquet/.arrow), a directory or a hub id.

    JSONL, Parquet, Arrow and `save_to_disk` data are read as they are iterated (a JSON
    array file and CSV are parsed whole); a missing file or split is reported at once.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl", ".txt"):
            return Rows(lambda: iter_json(path))
        if suffix == ".csv":
            return Rows(lambda: iter(_read_csv(path)))
        if suffix == ".parquet":
            return Rows(lambda: _iter_parquet(path))
        if suffix == ".arrow":
            import datasets  # lazy: only Arrow needs it; the file is memory-mapped

            return _hf_rows(datasets.Dataset.from_file(str(path)), str(path))
        raise DataError(
            str(path),
            f"unsupported file type {suffix!r}.",
            "use .json, .jsonl, .csv, .parquet or .arrow.",
        )
    if path.suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(
            source,
            "file not found.",
            "check data_path (relative paths start at the working directory).",
        )
    return read_hub(source, split=split, subset=subset)


def decode_lines(path: Path, data: bytes | None = None) -> list[str]:
    """Lines of a UTF-8 file; a non-UTF-8 byte is reported with its line number."""
    raw = path.read_bytes() if data is None else data
    if not raw.strip():
        raise DataError(str(path), "the file is empty.", "point data_path at a file with data.")
    out = [_decode(line, path, number) for number, line in enumerate(raw.split(b"\n"), start=1)]
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]  # a UTF-8 byte order mark
    return out


def _decode(line: bytes, path: Path, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{number}",
            f"not valid UTF-8 (byte {line[err.start]:#x} at column {err.start + 1}).",
            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name}`.",
        ) from None


def _loads(text: str, where: str, what: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = where if what == "JSON line" else f"{where}:{err.lineno}"
        raise DataError(line, f"malformed {what} ({err.msg}, column {err.colno}).", fix) from None
    except RecursionError:  # e.g. 200,000 nested brackets: a data error, not a traceback
        raise DataError(
            where,
            f"nested too deeply to read (more than {sys.getrecursionlimit()} levels).",
            "flatten this row or remove it.",
        ) from None


def read_json(path: Path, data: bytes | None = None) -> list[Row]:
    """A JSON array of objects, or JSON Lines (one object per line), read whole."""
    if data is None:
        return list(iter_json(path))
    lines = decode_lines(path, data)
    text = "\n".join(lines)
    if text.lstrip().startswith("["):
        return _json_array(text, path)
    return [row for number, line in enumerate(lines, start=1) if (row := _line(line, path, number))]


def iter_json(path: Path) -> Iterator[Row]:
    """Rows of a JSON Lines file one line at a time (a JSON array file is parsed whole)."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        yield from _json_array("\n".join(decode_lines(path)), path)
        return
    found = False
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, number)
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a UTF-8 byte order mark
            row = _line(line, path, number)
            if row is not None:
                found = True
                yield row
    if not found:
        raise DataError(str(path), "the file is empty.", "point data_path at a file with data.")


def _json_array(text: str, path: Path) -> list[Row]:
    items = _loads(text, str(path), "JSON", "fix the JSON, or write one object per line (JSONL).")
    if not isinstance(items, list):
        raise DataError(str(path), "expected a JSON array of objects.", "write one per line.")
    return [_object(item, f"{path} item {k}") for k, item in enumerate(items)]


def _line(line: str, path: Path, number: int) -> Row | None:
    if not line.strip():
        return None
    where = f"{path}:{number}"
    item = _loads(
        line,
        where,
        "JSON line",
        "each line must be one complete JSON object; fix or delete this line.",
    )
    return _object(item, where)


def _object(item: Any, where: str) -> Row:
    if not isinstance(item, dict):
        raise DataError(
            where,
            f"expected a JSON object, got {type(item).__name__}.",
            'write each example as an object, e.g. {"messages": [...]}.',
        )
    item["_origin"] = where
    return item


def _read_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO("\n".join(decode_lines(path))))
    rows = []
    for row in reader:
        row = dict(row)
        row["_origin"] = f"{path}:{reader.line_num}"
        rows.append(row)
    if not rows:
        raise DataError(str(path), "the CSV file has a header but no rows.", "add rows.")
    return rows


def _iter_parquet(path: Path) -> Iterator[Row]:
    """Record batches of ARROW_BATCH rows: the file is never held whole as Python objects."""
    import pyarrow.parquet as pq

    k = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH):
        for record in batch.to_pylist():
            record["_origin"] = f"{path} row {k}"
            k += 1
            yield record
    if k == 0:
        raise DataError(str(path), "the dataset is empty.", "point data_path at data with rows.")


def _hf_rows(ds: Any, name: str) -> Rows:
    """A `datasets.Dataset` (memory-mapped Arrow) read ARROW_BATCH rows at a time."""

    def produce() -> Iterator[Row]:
        k = 0
        for batch in ds.iter(batch_size=ARROW_BATCH):
            keys = list(batch)
            for values in zip(*(batch[key] for key in keys), strict=True):
                row = dict(zip(keys, values, strict=True))
                row["_origin"] = f"{name} row {k}"
                k += 1
                yield row
        if k == 0:
            raise DataError(name, "the dataset is empty.", "point data_path at data with rows.")

    return Rows(produce)


def _read_saved(path: Path, split: str | None) -> Rows:
    """A `save_to_disk` directory, or else a directory of data files (a hub clone)."""
    import datasets

    saved = any((path / name).is_file() for name in SAVED_MARKERS)
    if not saved:
        return read_hub(str(path), split=split)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[_pick_split(list(ds), split, str(path))]
    return _hf_rows(ds, str(path))


def read_hub(name: str, split: str | None = None, subset: str | None = None, **kwargs: Any) -> Rows:
    """A hub dataset (or a local directory of data files) through `datasets.load_dataset`.

    `split` defaults to "train". Failures (no network, unknown id, no data files) become
    a `DataError` naming the id, so they read as a data problem, not a crash.
    """
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, **kwargs)
    except Exception as err:  # datasets raises many types: connection, not found, empty dir
        local = Path(name).expanduser().is_dir()
        raise DataError(
            name,
            f"could not load it {'as a data directory' if local else 'from the Hugging Face Hub'}"
            f" ({type(err).__name__}: {_first_line(err)}).",
            "give a local .jsonl/.json/.csv/.parquet file or a save_to_disk directory, or a "
            "hub dataset id that is reachable (offline: download it first and point "
            "data_path at the local copy).",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[_pick_split(list(ds), split, name)]
    return _hf_rows(ds, f"{name}[{split or 'train'}]")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else "no message"


def _pick_split(available: list[str], split: str | None, name: str) -> str:
    wanted = split or "train"
    if wanted not in available:
        raise DataError(
            name, f"has no split {wanted!r} (splits: {available}).", "set split to one of them."
        )
    return wanted
