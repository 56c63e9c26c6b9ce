"""Read rows from local files or the hub, keeping each row's origin for error messages.

JSON and JSONL are read with the standard library, one line at a time, so a bad line is
reported by number and rows are never schema-unified (Arrow would None-fill missing keys
of heterogeneous tool arguments). `datasets` is imported only for Arrow, Parquet,
`save_to_disk` directories and hub ids.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from sftkit.data.errors import DataError

Row = dict[str, Any]
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".gz")
# Files `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write at the top level.
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def read_rows(source: str, split: str | None = None, subset: str | None = None) -> list[Row]:
    """Rows of a local file (.json/.jsonl/.csv/.parquet/.arrow), a directory or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl", ".txt"):
            return read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix in (".parquet", ".arrow"):
            return _read_arrow(path, suffix)
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
    lines = raw.split(b"\n")
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}:{number}",
                f"not valid UTF-8 (byte {line[err.start]:#x} at column {err.start + 1}).",
                f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name}`.",
            ) from None
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]  # a UTF-8 byte order mark
    return out


def read_json(path: Path, data: bytes | None = None) -> list[Row]:
    """A JSON array of objects, or JSON Lines (one object per line)."""
    lines = decode_lines(path, data)
    text = "\n".join(lines)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{err.lineno}",
                f"malformed JSON ({err.msg}, column {err.colno}).",
                "fix the JSON, or write one object per line (JSONL).",
            ) from None
        return [_object(item, f"{path} item {k}") for k, item in enumerate(items)]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}",
                f"malformed JSON line ({err.msg}, column {err.colno}).",
                "each line must be one complete JSON object; fix or delete this line.",
            ) from None
        rows.append(_object(item, f"{path}:{number}"))
    return rows


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


def _with_origin(records: Any, name: str) -> list[Row]:
    rows = []
    for k, record in enumerate(records):
        row = dict(record)
        row["_origin"] = f"{name} row {k}"
        rows.append(row)
    if not rows:
        raise DataError(name, "the dataset is empty.", "point data_path at a dataset with rows.")
    return rows


def _read_arrow(path: Path, suffix: str) -> list[Row]:
    import datasets  # lazy: only Arrow/Parquet need it

    if suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(path))
    else:
        ds = datasets.Dataset.from_file(str(path))
    return _with_origin(ds, str(path))


def _read_saved(path: Path, split: str | None) -> list[Row]:
    """A `save_to_disk` directory, or else a directory of data files (a hub clone)."""
    import datasets

    saved = any((path / name).is_file() for name in SAVED_MARKERS)
    if not saved:
        return read_hub(str(path), split=split)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[_pick_split(list(ds), split, str(path))]
    return _with_origin(ds, str(path))


def read_hub(
    name: str, split: str | None = None, subset: str | None = None, **kwargs: Any
) -> list[Row]:
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
    label = f"{name}[{split or 'train'}]"
    return _with_origin(ds, label)


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
