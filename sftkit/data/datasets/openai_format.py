"""`openai_format`: OpenAI chat rows with optional tools, read without schema unification."""

from __future__ import annotations

import logging

from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec
from sftkit.data.datasets.files import read_rows
from sftkit.data.datasets.response import _task_name
from sftkit.data.errors import DataError

logger = logging.getLogger("sftkit")


class OpenAIFormatDataset(RawDataset):
    """Rows hold `chat_key` messages; `tool_key` tools go to the chat template.

    The system message comes from `row[system_key]` or else the fixed `system_prompt`,
    when the conversation does not start with one. Tool calls may be flat
    (`{"name", "arguments"}`) or OpenAI-nested; argument dicts are kept exactly as written.
    `use_preserving_dataset` is accepted for compatibility: files are always read
    row by row without None-filling, whatever it says.
    """

    def __init__(
        self,
        data_path: str,
        chat_key: str = "messages",
        system_key: str | None = None,
        system_prompt: str | None = None,
        tool_key: str = "tools",
        use_preserving_dataset: bool = False,
        split: str | None = None,
        subset: str | None = None,
        split_validation_size: float | int = 0,
        seed: int = 42,
        prompt_file: str | None = None,
        system_prompt_file: str | None = None,
    ) -> None:
        del use_preserving_dataset  # rows are never schema-unified
        self.chat_key, self.system_key, self.tool_key = chat_key, system_key, tool_key
        self.system_prompt = system_prompt
        rows = read_rows(str(data_path), split=split, subset=subset).map(self.format_data)
        self.task_spec = TaskDataSpec(_task_name(str(data_path)), prompt_file, system_prompt_file)
        self.set_splits(rows, split_validation_size, seed)

    def format_data(self, row: Row) -> Row:
        where = row.get("_origin", "row")
        if self.chat_key not in row:
            raise DataError(
                where,
                f"missing key {self.chat_key!r}.",
                f"set chat_key to the column holding the messages (keys: "
                f"{sorted(k for k in row if k != '_origin')}).",
            )
        messages = row[self.chat_key]
        if not isinstance(messages, list) or not messages:
            raise DataError(where, f"{self.chat_key!r} must be a non-empty list of messages.")
        system = row.get(self.system_key) if self.system_key else None
        system = system if system is not None else self.system_prompt
        first_role = messages[0].get("role") if isinstance(messages[0], dict) else None
        if system is not None and first_role != "system":
            messages = [{"role": "system", "content": system}, *messages]
        last = messages[-1]
        if not (isinstance(last, dict) and last.get("role") == "assistant"):
            raise DataError(
                where,
                "the last message must be from the assistant (what is trained).",
                "end each conversation with the assistant's reply, or drop the trailing turns.",
            )
        out: Row = {"messages": messages, "_origin": where}
        tools = row.get(self.tool_key)
        if tools is not None:
            out["tools"] = tools
        return out
