"""OpenMathInstruct-2 (`nvidia/OpenMathInstruct-2`): problem -> `output_key`."""

from __future__ import annotations

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, require_text
from sftkit.data.datasets.files import read_hub, read_rows

SPLITS = ("train", "train_1M", "train_2M", "train_5M")


class OpenMathInstruct2Dataset(RawDataset):
    """`output_key` is `expected_answer` (default) or `generated_solution` (the recipes)."""

    def __init__(
        self,
        split: str = "train_1M",
        output_key: str = "expected_answer",
        data_path: str | None = None,
        split_validation_size: float | int = 0.05,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"OpenMathInstruct-2 split={split!r}: use one of {SPLITS}.")
        self.output_key = output_key
        source = (
            read_rows(data_path)
            if data_path
            else read_hub("nvidia/OpenMathInstruct-2", split=split)
        )
        self.task_spec = TaskDataSpec("OpenMathInstruct-2", prompt_file, system_prompt_file)
        self.set_splits(source.map(self.format_data), split_validation_size, seed)

    def format_data(self, row: Row) -> Row:
        where = row.get("_origin", "row")
        return {
            "messages": [
                {"role": "user", "content": require_text(row, "problem", where)},
                {"role": "assistant", "content": require_text(row, self.output_key, where)},
            ],
            "_origin": where,
        }
