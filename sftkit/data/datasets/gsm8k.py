"""GSM8K (`openai/gsm8k`, subset main or socratic): question -> answer."""

from __future__ import annotations

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, require_text
from sftkit.data.datasets.files import read_hub, read_rows


class GSM8KDataset(RawDataset):
    """`extract_answer` keeps only the text after "####" (NeMo RL's default)."""

    def __init__(
        self,
        split: str = "train",
        subset: str = "main",
        extract_answer: bool = True,
        data_path: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        self.extract_answer = extract_answer
        source = (
            read_rows(data_path)
            if data_path
            else read_hub("openai/gsm8k", split=split, subset=subset)
        )
        self.task_spec = TaskDataSpec("gsm8k", prompt_file, system_prompt_file)
        self.set_splits(source.map(self.format_data), split_validation_size, seed)

    def format_data(self, row: Row) -> Row:
        where = row.get("_origin", "row")
        answer = require_text(row, "answer", where)
        if self.extract_answer and "####" in answer:
            answer = answer.split("####")[-1].strip()
        return {
            "messages": [
                {"role": "user", "content": require_text(row, "question", where)},
                {"role": "assistant", "content": answer},
            ],
            "_origin": where,
        }
