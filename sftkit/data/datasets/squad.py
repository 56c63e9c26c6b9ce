"""SQuAD (`rajpurkar/squad`): system = context, user = question, assistant = first answer."""

from __future__ import annotations

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, require
from sftkit.data.datasets.files import read_hub, read_rows
from sftkit.data.errors import DataError


class SquadDataset(RawDataset):
    """`split` selects the hub split; `data_path` reads a local file in SQuAD's schema."""

    def __init__(
        self,
        split: str = "train",
        data_path: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source = read_rows(data_path) if data_path else read_hub("rajpurkar/squad", split=split)
        self.task_spec = TaskDataSpec("SQuAD", prompt_file, system_prompt_file)
        self.set_splits(source.map(format_squad), split_validation_size, seed)


def format_squad(row: Row) -> Row:
    where = row.get("_origin", "row")
    answers = require(row, "answers", where)
    texts = answers.get("text") if isinstance(answers, dict) else None
    if not texts or not isinstance(texts[0], str):
        raise DataError(where, "'answers.text' must be a non-empty list of strings.")
    return {
        "messages": [
            {"role": "system", "content": require(row, "context", where)},
            {"role": "user", "content": require(row, "question", where)},
            {"role": "assistant", "content": texts[0]},
        ],
        "_origin": where,
    }
