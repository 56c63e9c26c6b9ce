"""Bad input: every case names the file and line (or row) and says how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer

from sftkit.data.datasets import load_dataset, rows_of
from sftkit.data.errors import DataError
from sftkit.data.processor import Processor, ProcessorSettings

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _load(path: Path, **kw):
    ds = load_dataset({"dataset_name": "openai_format", "data_path": str(path), **kw})
    processor = Processor(make_tokenizer("qwen25"), ProcessorSettings(max_length=512))
    return [processor.process(row, "t") for row in rows_of(ds, "train")]


def _write(tmp_path: Path, lines: list[str] | bytes) -> Path:
    path = tmp_path / "train.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"messages": [', r"train.jsonl:2: malformed JSON line"),
        ('["not", "an", "object"]', r"train.jsonl:2: expected a JSON object"),
        ('{"chat": []}', r"train.jsonl:2: missing key 'messages'"),
        (
            '{"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            r"train.jsonl:2 message 0: unknown role 'human'.*Fix: use one of",
        ),
        (
            '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
            r"train.jsonl:2 message 0: user content must be a string, got int",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}',
            r"train.jsonl:2 message 1: assistant message has content null",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}',
            r"train.jsonl:2 message 1: empty assistant turn",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": [{"arguments": {}}]}]}',
            r"train.jsonl:2 message 1: tool_calls\[0\] has no function name",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, line: str, pattern: str):
    path = _write(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(DataError, match=pattern) as info:
        _load(path)
    assert (
        "Fix:" in str(info.value) or "must be" in str(info.value) or "expected" in str(info.value)
    )


def test_non_utf8_and_empty_files(tmp_path: Path):
    path = _write(tmp_path, json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8.*iconv"):
        _load(path)
    with pytest.raises(DataError, match="the file is empty"):
        _load(_write(tmp_path, b"\n\n"))
    with pytest.raises(DataError, match="file not found"):
        _load(tmp_path / "missing.jsonl")


def test_template_rejection_is_a_data_error():
    processor = Processor(make_tokenizer("mistral"), ProcessorSettings(max_length=512))
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
        "_origin": "f.jsonl:3",
    }
    with pytest.raises(DataError, match=r"f.jsonl:3: the chat template rejected.*alternate"):
        processor.process(row, "t")


def test_tool_only_turn_never_renders_none():
    processor = Processor(make_tokenizer("qwen25"), ProcessorSettings(max_length=512))
    row = {
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "f", "arguments": {"a": 1}}],
            },
            {"role": "tool", "content": "r", "name": None},
            {"role": "assistant", "content": "done"},
        ]
    }
    _, _, text = processor.encode(row)
    assert "None" not in text and '"arguments": {"a": 1}' in text
