"""The dataset protocol of NeMo RL's SFT guide: `formatted_ds` and `task_spec`.

A dataset is any object with `formatted_ds = {"train": rows, "validation": rows | None}`
and `task_spec` (a `TaskDataSpec` naming the task). Rows are dicts with `messages`
(role/content dicts), optionally `tools`, and `_origin` (file and line, for errors).
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftkit.data.datasets.files import Rows
from sftkit.data.errors import DataError

logger = logging.getLogger("sftkit")

Row = dict[str, Any]


@dataclass
class TaskDataSpec:
    """A task's name plus the optional prompt templates read from files.

    `prompt` is a `str.format` template with one `{}` applied to the first user turn;
    `system_prompt` is inserted as the system message when a conversation has none
    (NeMo RL reads but never inserts it in SFT).
    """

    task_name: str
    prompt_file: str | None = None
    system_prompt_file: str | None = None
    prompt: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_file and self.prompt is None:
            self.prompt = _read_text(self.prompt_file, "prompt_file")
            _check_placeholder(self.prompt, self.prompt_file)
        if self.system_prompt_file and self.system_prompt is None:
            self.system_prompt = _read_text(self.system_prompt_file, "system_prompt_file")

    def apply(self, row: Row) -> Row:
        """Return the row with the prompt template and system prompt applied."""
        if not self.prompt and not self.system_prompt:
            return row
        messages = [dict(m) if isinstance(m, dict) else m for m in row.get("messages") or []]
        if self.prompt:
            for message in messages:
                if isinstance(message, dict) and message.get("role") == "user":
                    message["content"] = self.prompt.format(message.get("content"))
                    break
        if self.system_prompt and not (
            messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"
        ):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {**row, "messages": messages}


def _check_placeholder(template: str, path: str) -> None:
    """A prompt file must hold one `{}` where the question goes: without it `str.format`
    would drop the question silently, and a named field would fail on every row."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # an unmatched brace
        raise ValueError(
            f"prompt_file {path}: {err}; write literal braces as {{{{ and }}}}."
        ) from None
    if not fields or any(f not in ("", "0") for f in fields):
        found = f" (found {{{fields[0]}}})" if fields else ""
        raise ValueError(
            f"prompt_file {path} has no {{}} placeholder for the question{found}: put {{}} "
            "where the user's text goes (write literal braces as {{ and }})."
        )


# A relative prompt file is looked up in the working directory (as NeMo RL does), then in
# sftkit's own checkout: NeMo RL recipes name `examples/prompts/math.txt`, which sftkit ships.
REPO = Path(__file__).resolve().parents[3]
# sftkit's own wording of NeMo RL's prompt files of the same names (same task, same answer
# form); a run reading one says so once, since it is not NeMo RL's exact text.
SHIPPED_PROMPTS = REPO / "examples" / "prompts"
_announced: set[Path] = set()


def _read_text(path: str, key: str) -> str:
    file = Path(path).expanduser()
    candidates = [file] if file.is_absolute() else [file, REPO / file]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = " or ".join(str(c.resolve()) for c in candidates)
        raise ValueError(f"data.*.{key}={path!r}: file not found ({where}). Give a text file.")
    resolved = found.resolve()
    if resolved.parent == SHIPPED_PROMPTS.resolve() and resolved not in _announced:
        _announced.add(resolved)
        logger.info(
            "%s %s is sftkit's copy of NeMo RL's prompt of that name (%s), in sftkit's own "
            "words; to train NeMo RL's exact prompt, set it to your NeMo RL checkout's "
            "examples/prompts/%s.",
            key,
            path,
            resolved,
            resolved.name,
        )
    return found.read_text(encoding="utf-8")


def read_prompt_text(path: str, key: str) -> str:
    """A prompt file's text, found as `TaskDataSpec` finds it, without the `{}` check
    (NeMo RL's multiple-choice prompts have none: the question and options follow them)."""
    return _read_text(path, key)


class RawDataset:
    """Base class: subclasses set `formatted_ds` and `task_spec` in `__init__`."""

    formatted_ds: dict[str, Sequence[Row] | None]
    task_spec: TaskDataSpec

    def set_splits(
        self, rows: Sequence[Row], split_validation_size: float | int = 0, seed: int = 42
    ) -> None:
        """Set `formatted_ds`, holding out a fraction (< 1) or a count (>= 1) for validation."""
        train, validation = split_rows(rows, split_validation_size, seed)
        self.formatted_ds = {"train": train, "validation": validation}


def split_rows(
    rows: Sequence[Row], size: float | int, seed: int
) -> tuple[Sequence[Row], Sequence[Row] | None]:
    """Seeded split into (train, validation); validation is None when size is 0.

    Lazily read `Rows` stay lazy: the split is a mask over row positions, so a pass over
    either part reads the source again and skips the other part's rows.
    """
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ValueError(
            f"split_validation_size={size!r}: use a fraction in (0, 1) (0.05 for 5%) or a row "
            "count >= 1."
        )
    if not size:
        return rows, None
    if size < 0 or (isinstance(size, float) and size >= 1 and not float(size).is_integer()):
        raise ValueError(
            f"split_validation_size={size!r}: use a fraction in (0, 1) or a row count >= 1."
        )
    count = int(size) if size >= 1 else max(1, round(len(rows) * size))
    if count >= len(rows):
        raise ValueError(
            f"split_validation_size={size!r} holds out {count} of {len(rows)} rows, leaving no "
            "training data. Use a smaller fraction or count."
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if isinstance(rows, Rows):
        mask = np.zeros(len(rows), dtype=bool)
        mask[order[:count]] = True
        return _masked(rows, mask, False), _masked(rows, mask, True)
    held = set(order[:count])
    train = [r for i, r in enumerate(rows) if i not in held]
    validation = [rows[i] for i in sorted(held)]
    return train, validation


def _masked(rows: Rows, mask: np.ndarray, keep: bool) -> Rows:
    return Rows(lambda: (r for r, m in zip(rows, mask.tolist(), strict=True) if m == keep))


def require(row: Row, key: str, where: str, hint: str = "") -> Any:
    """`row[key]`, or a `DataError` naming the row when the key is missing or null."""
    if key not in row:
        raise DataError(
            where,
            f"missing key {key!r} (keys: {sorted(k for k in row if k != '_origin')}).",
            hint or f"add {key!r} to every row, or point the dataset at the right column.",
        )
    if row[key] is None:
        raise DataError(where, f"{key!r} is null.", "give it a value, or drop the row.")
    return row[key]


def require_text(row: Row, key: str, where: str, hint: str = "") -> str:
    """A string field; numbers are written out, other types are errors."""
    value = require(row, key, where, hint)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            where,
            f"{key!r} must be a string, got {type(value).__name__}.",
            "convert it to text in your data.",
        )
    return value if isinstance(value, str) else str(value)
