"""`ResponseDataset`: input/output columns (or ready `messages`) from a file or the hub."""

from __future__ import annotations

from pathlib import Path

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, require_text
from sftkit.data.datasets.files import read_rows


class ResponseDataset(RawDataset):
    """Rows map to `[user: input_key, assistant: output_key]`; rows with `messages` are kept.

    `data_path` is a local .json/.jsonl/.csv/.parquet/.arrow file, a `save_to_disk`
    directory, or a hub id (`split`, `subset`). `split_validation_size` holds out a
    fraction (< 1) or a count (>= 1) of rows for validation, shuffled with `seed`.
    """

    def __init__(
        self,
        data_path: str,
        input_key: str = "input",
        output_key: str = "output",
        subset: str | None = None,
        split: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        self.input_key, self.output_key = input_key, output_key
        rows = read_rows(str(data_path), split=split, subset=subset).map(self.format_data)
        self.task_spec = TaskDataSpec(_task_name(str(data_path)), prompt_file, system_prompt_file)
        self.set_splits(rows, split_validation_size, seed)

    def format_data(self, row: Row) -> Row:
        """One source row to `{"messages": [...]}` (origin kept)."""
        if "messages" in row:
            return row
        where = row.get("_origin", "row")
        hint = (
            f"set input_key/output_key to your columns (now {self.input_key!r}/"
            f"{self.output_key!r}), or give rows a 'messages' list."
        )
        return {
            "messages": [
                {"role": "user", "content": require_text(row, self.input_key, where, hint)},
                {"role": "assistant", "content": require_text(row, self.output_key, where, hint)},
            ],
            "_origin": where,
        }


def _task_name(data_path: str) -> str:
    # NeMo RL names the task after the last two path components
    parts = Path(data_path.rstrip("/")).parts[-2:]
    return "/".join(parts) or data_path
