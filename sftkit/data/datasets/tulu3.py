"""Tulu 3 SFT mixture (`allenai/tulu-3-sft-mixture`): native `messages`."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, require
from sftkit.data.datasets.files import read_hub, read_rows
from sftkit.data.errors import DataError


class Tulu3SftMixtureDataset(RawDataset):
    """`max_samples` keeps a seeded random subset; the last message must be the assistant's."""

    def __init__(
        self,
        max_samples: int | None = None,
        data_path: str | None = None,
        split: str = "train",
        split_validation_size: float | int = 0.05,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source: Sequence[Row] = (
            read_rows(data_path)
            if data_path
            else read_hub("allenai/tulu-3-sft-mixture", split=split)
        )
        if max_samples is not None and max_samples < len(source):
            picked = set(random.Random(seed).sample(range(len(source)), max_samples))
            source = [row for i, row in enumerate(source) if i in picked]
        self.task_spec = TaskDataSpec("tulu3_sft_mixture", prompt_file, system_prompt_file)
        self.set_splits([format_tulu3(r) for r in source], split_validation_size, seed)


def format_tulu3(row: Row) -> Row:
    where = row.get("_origin", "row")
    messages = require(row, "messages", where)
    if (
        not messages
        or not isinstance(messages[-1], dict)
        or messages[-1].get("role") != "assistant"
    ):
        raise DataError(
            where,
            "the last message is not from the assistant.",
            "drop the row or end it with the assistant's reply.",
        )
    return {"messages": messages, "_origin": where}  # `id` and `source` are dropped
