"""NeMo RL's newer math datasets, under its registry names (hub schemas as NeMo RL reads them).

- `NuminaMath-1.5` (`AI-MO/NuminaMath-1.5`): problem -> answer, keeping only rows with a
  checkable answer (not "proof"/"notfound", question_type not "proof") and, by default,
  rows marked valid (`problem_is_valid` and `solution_is_valid` == "Yes");
- `OpenR1-Math-220k` (`open-r1/OpenR1-Math-220k`, subset "default"): problem -> answer;
- `Nemotron-Cascade-2-SFT-Math` (`nvidia/Nemotron-Cascade-2-SFT-Data`, config "math"): its
  own `messages`, which must end with the assistant; `max_samples` takes a seeded sample;
- `DAPOMath17K` (`BytedTsinghua-SIA/DAPO-Math-17k`): `prompt[0].content` ->
  `reward_model.ground_truth`;
- `DeepScaler` (`agentica-org/DeepScaleR-Preview-Dataset`): problem -> answer.

Every class also reads a local file in the same schema (`data_path`).
"""

from __future__ import annotations

import random
from typing import Any

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, require, require_text
from sftkit.data.datasets.files import Rows, read_hub, read_rows
from sftkit.data.errors import DataError

NON_VERIFIABLE_ANSWERS = frozenset({"proof", "notfound"})  # NuminaMath's "no answer" values


def _source(data_path: str | None, hub: str, split: str, subset: str | None = None) -> Rows:
    return read_rows(data_path) if data_path else read_hub(hub, split=split, subset=subset)


def _pair(row: Row, question: str, answer: str) -> Row:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "_origin": row.get("_origin", "row"),
    }


class _ProblemAnswer(RawDataset):
    """problem -> answer."""

    task_name = ""

    def format_data(self, row: Row) -> Row:
        where = row.get("_origin", "row")
        return _pair(row, require_text(row, "problem", where), require_text(row, "answer", where))


class NuminaMath15Dataset(_ProblemAnswer):
    task_name = "NuminaMath-1.5"

    def __init__(
        self,
        split: str = "train",
        verifiable_only: bool = True,
        require_valid: bool = True,
        data_path: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source = _source(data_path, "AI-MO/NuminaMath-1.5", split)
        keep = [self._verifiable] * verifiable_only + [self._valid] * require_valid
        rows = Rows(lambda: (r for r in source if all(f(r) for f in keep)))
        self.task_spec = TaskDataSpec(self.task_name, prompt_file, system_prompt_file)
        self.set_splits(rows.map(self.format_data), split_validation_size, seed)

    @staticmethod
    def _verifiable(row: Row) -> bool:
        answer = str(row.get("answer") or "").strip()
        if not answer or answer.lower() in NON_VERIFIABLE_ANSWERS:
            return False
        return str(row.get("question_type") or "").strip().lower() != "proof"

    @staticmethod
    def _valid(row: Row) -> bool:
        return row.get("problem_is_valid") == "Yes" and row.get("solution_is_valid") == "Yes"


class OpenR1Math220KDataset(_ProblemAnswer):
    task_name = "OpenR1-Math-220k"

    def __init__(
        self,
        subset: str | None = "default",
        split: str = "train",
        data_path: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source = _source(data_path, "open-r1/OpenR1-Math-220k", split, subset or "default")
        self.task_spec = TaskDataSpec(self.task_name, prompt_file, system_prompt_file)
        self.set_splits(source.map(self.format_data), split_validation_size, seed)


class DeepScalerDataset(_ProblemAnswer):
    task_name = "DeepScaler"

    def __init__(
        self,
        data_path: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source = _source(data_path, "agentica-org/DeepScaleR-Preview-Dataset", "train")
        self.task_spec = TaskDataSpec(self.task_name, prompt_file, system_prompt_file)
        self.set_splits(source.map(self.format_data), split_validation_size, seed)


class DAPOMath17KDataset(RawDataset):
    task_name = "DAPOMath17K"

    def __init__(
        self,
        data_path: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source = _source(data_path, "BytedTsinghua-SIA/DAPO-Math-17k", "train")
        self.task_spec = TaskDataSpec(self.task_name, prompt_file, system_prompt_file)
        self.set_splits(source.map(self.format_data), split_validation_size, seed)

    def format_data(self, row: Row) -> Row:
        where = row.get("_origin", "row")
        prompt, reward = require(row, "prompt", where), require(row, "reward_model", where)
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            raise DataError(where, "'prompt' must be a list of {role, content} messages.")
        if not isinstance(reward, dict):
            raise DataError(where, "'reward_model' must be an object with 'ground_truth'.")
        question = require_text(prompt[0], "content", f"{where} prompt[0]")
        return _pair(row, question, require_text(reward, "ground_truth", f"{where} reward_model"))


class NemotronCascade2SFTMathDataset(RawDataset):
    task_name = "Nemotron-Cascade-2-SFT-Math"

    def __init__(
        self,
        split: str = "train",
        max_samples: int | None = None,
        data_path: str | None = None,
        split_validation_size: float | int = 0.05,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        source = _source(data_path, "nvidia/Nemotron-Cascade-2-SFT-Data", split, "math")
        rows: Any = source.map(self.format_data)
        if max_samples is not None and max_samples > 0:  # NeMo RL: seeded shuffle, then select
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            chosen = set(order[:max_samples])
            rows = [r for k, r in enumerate(rows) if k in chosen]
        self.task_spec = TaskDataSpec(self.task_name, prompt_file, system_prompt_file)
        self.set_splits(rows, split_validation_size, seed)

    def format_data(self, row: Row) -> Row:
        where = row.get("_origin", "row")
        messages = require(row, "messages", where)
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise DataError(where, "'messages' must be a non-empty list of {role, content}.")
        if messages[-1].get("role") != "assistant":
            raise DataError(
                where,
                f"the last message is from {messages[-1].get('role')!r}, not the assistant.",
                "end each conversation with the assistant's reply, or drop the row.",
            )
        return {"messages": messages, "_origin": where}
