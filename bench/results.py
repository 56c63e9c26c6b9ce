"""One JSON line per result, printed and appended to the bench's output file as it finishes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(record: dict[str, Any], out: Path | None) -> None:
    """Print `record` as one JSON line and append it to `out` (when given)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")
