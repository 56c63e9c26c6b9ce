"""Metric sinks behind one protocol: the run directory, metrics.jsonl and TensorBoard.

Every run writes `logger.log_dir/exp_NNN/metrics.jsonl`: one JSON object per line,
`{"step": <optimizer step>, "<flat/metric/name>": value, ...}`. The trackers that need a
service or an account (wandb, MLflow) live in `sftkit.log.trackers`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

_EXP_DIR = re.compile(r"^exp_(\d+)$")


@runtime_checkable
class MetricSink(Protocol):
    """Where metrics go. `log` is called with flat names (`train/loss`) and the step."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """The sink used when logging is off (and on ranks other than 0): does nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def next_exp_dir(log_dir: str | Path) -> Path:
    """Create and return `log_dir/exp_NNN`, one past the highest existing number.

    Numbering starts at `exp_001`, as in NeMo RL, with at least 3 digits. Two processes starting at
    once never share a directory: `mkdir` without `exist_ok` fails for the loser, which
    takes the next number.
    """
    root = Path(log_dir)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _EXP_DIR.match(p.name))]
    index = max(numbers, default=0) + 1
    while True:
        path = root / f"exp_{index:03d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            index += 1


def to_number(value: Any) -> float | int | None:
    """A JSON-safe number: tensors and NumPy scalars unwrapped, NaN/inf as None (null).

    Strict JSON has no NaN, and tools such as `jq` reject it; a null keeps the line valid.
    """
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


class JsonlSink:
    """Append `{"step": step, **metrics}` to `exp_dir/metrics.jsonl`, flushed every line."""

    def __init__(self, exp_dir: str | Path, filename: str = "metrics.jsonl") -> None:
        self.path = Path(exp_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line buffering plus an explicit flush: a killed run keeps every line it logged.
        self._file = self.path.open("a", encoding="utf-8", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": int(step), **{name: to_number(v) for name, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order (for tests and tools)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TensorboardSink:
    """Scalars in `exp_dir/tensorboard` through `torch.utils.tensorboard.SummaryWriter`."""

    def __init__(self, exp_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch imports tensorboard lazily, here
            raise ImportError(
                "logger.tensorboard_enabled=true needs the tensorboard package: "
                "pip install 'sftkit[tensorboard]' (or set logger.tensorboard_enabled=false)"
            ) from e
        self.log_dir = Path(exp_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            number = to_number(value)
            self._writer.add_scalar(name, float("nan") if number is None else number, step)
        # One flush per logging call (once per step): a crash loses no scalars.
        self._writer.flush()

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        """Validation samples as one Markdown text entry (`val_samples`) at `step`."""
        rows = "\n\n".join(
            f"**prompt** `{r['prompt']}`  \n**reference** `{r['reference']}`  \n"
            f"**generated** `{r['generated']}`"
            for r in records
        )
        self._writer.add_text("val_samples", rows, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
