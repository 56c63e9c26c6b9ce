"""Dataset classes, file formats, splits, prompts and the registry, on local files."""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import pytest
from conftest import FIXTURES

from sftkit.data.datasets import DATASETS, load_dataset, resolve_class, rows_of
from sftkit.data.datasets.base import RawDataset, TaskDataSpec

DATA = FIXTURES / "data"


def _messages(ds, split="train"):
    return [r["messages"] for r in rows_of(ds, split)]


def test_response_dataset_maps_keys_and_names_task():
    ds = load_dataset(
        {
            "dataset_name": "ResponseDataset",
            "data_path": str(DATA / "response.jsonl"),
            "input_key": "question",
            "output_key": "answer",
        }
    )
    assert _messages(ds)[0] == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    assert ds.task_spec.task_name == "data/response.jsonl"
    assert ds.formatted_ds["validation"] is None


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet", "arrow", "disk"])
def test_response_dataset_reads_every_local_format(tmp_path: Path, fmt: str):
    import datasets

    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    else:
        path = tmp_path / "saved_dir"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    loaded = load_dataset({"data_path": str(path)})
    assert [m[1]["content"] for m in _messages(loaded)] == [f"a{i}" for i in range(5)]
    assert all("_origin" in r for r in rows_of(loaded, "train"))


@pytest.mark.parametrize(("size", "expected"), [(0.25, 1), (2, 2)])
def test_split_validation_size_fraction_or_count_is_seeded(size, expected):
    entry = {
        "data_path": str(DATA / "response.jsonl"),
        "input_key": "question",
        "output_key": "answer",
        "split_validation_size": size,
        "seed": 7,
    }
    a, b = load_dataset(entry), load_dataset(entry)
    assert len(rows_of(a, "validation")) == expected
    assert len(rows_of(a, "train")) == 4 - expected
    assert _messages(a, "validation") == _messages(b, "validation")


def test_prompt_and_system_prompt_files(tmp_path: Path):
    (tmp_path / "p.txt").write_text("Solve: {}")
    (tmp_path / "s.txt").write_text("You are a math tutor.")
    ds = load_dataset(
        {
            "data_path": str(DATA / "response.jsonl"),
            "input_key": "question",
            "output_key": "answer",
            "prompt_file": str(tmp_path / "p.txt"),
            "system_prompt_file": str(tmp_path / "s.txt"),
        }
    )
    row = ds.task_spec.apply(rows_of(ds, "train")[0])
    assert row["messages"][0] == {"role": "system", "content": "You are a math tutor."}
    assert row["messages"][1]["content"] == "Solve: What is the capital of France?"
    with pytest.raises(ValueError, match="prompt_file.*not found"):
        TaskDataSpec("x", prompt_file=str(tmp_path / "missing.txt"))


def test_openai_format_keeps_heterogeneous_tool_arguments_exactly():
    ds = load_dataset(
        {
            "dataset_name": "openai_format",
            "data_path": str(DATA / "tools_heterogeneous.jsonl"),
            "use_preserving_dataset": False,
        }
    )
    rows = rows_of(ds, "train")
    assert rows[0]["messages"][1]["tool_calls"][0]["arguments"] == {"query": "weather Paris"}
    nested = rows[1]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert list(nested) == ["expression", "precision"] and nested["precision"] == 2
    assert "tools" in rows[0] and rows[0]["tools"][0]["name"] == "search"


def test_openai_format_system_key_and_prompt(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(
            {
                "sys": "S1",
                "messages": [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ],
            }
        )
        + "\n"
    )
    ds = load_dataset(
        {"dataset_name": "openai_format", "data_path": str(path), "system_key": "sys"}
    )
    assert _messages(ds)[0][0] == {"role": "system", "content": "S1"}
    ds = load_dataset(
        {"dataset_name": "openai_format", "data_path": str(path), "system_prompt": "S2"}
    )
    assert _messages(ds)[0][0] == {"role": "system", "content": "S2"}


def test_builtins_read_their_source_schemas():
    squad = load_dataset({"dataset_name": "squad", "data_path": str(DATA / "squad.jsonl")})
    assert _messages(squad)[1] == [
        {"role": "system", "content": "12 + 30 = 42."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
    ]
    gsm = load_dataset({"dataset_name": "gsm8k", "data_path": str(DATA / "gsm8k.jsonl")})
    assert _messages(gsm)[0][1]["content"] == "42"
    full = load_dataset(
        {"dataset_name": "gsm8k", "data_path": str(DATA / "gsm8k.jsonl"), "extract_answer": False}
    )
    assert _messages(full)[0][1]["content"].endswith("#### 42")
    om = load_dataset(
        {
            "dataset_name": "OpenMathInstruct-2",
            "data_path": str(DATA / "openmath.jsonl"),
            "output_key": "generated_solution",
            "split_validation_size": 0,
        }
    )
    assert _messages(om)[0][1]["content"].startswith("We add")
    tulu = load_dataset(
        {
            "dataset_name": "tulu3_sft_mixture",
            "data_path": str(DATA / "tulu3.jsonl"),
            "max_samples": 2,
            "split_validation_size": 0,
        }
    )
    assert len(rows_of(tulu, "train")) == 2 and "id" not in rows_of(tulu, "train")[0]


def test_open_assistant_trees_become_threads():
    ds = load_dataset(
        {
            "dataset_name": "open_assistant",
            "data_path": str(DATA / "oasst_trees.jsonl"),
            "split_validation_size": 0,
        }
    )
    threads = [[(m["role"], m["content"]) for m in msgs[1:]] for msgs in _messages(ds)]
    assert threads == [
        [
            ("user", "What is the capital of France?"),
            ("assistant", "Paris."),
            ("user", "Thanks"),
            ("assistant", "Goodbye!"),
        ],
        [("user", "What is the capital of France?"), ("assistant", "The capital is Paris.")],
    ]
    assert _messages(ds)[0][0]["role"] == "system"


class MyDataset(RawDataset):
    """A drop-in: any class with formatted_ds and task_spec."""

    def __init__(self, n: int = 2) -> None:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": f"a{i}"},
                ]
            }
            for i in range(n)
        ]
        self.formatted_ds = {"train": rows, "validation": rows[:1]}
        self.task_spec = TaskDataSpec("mine")


def test_registry_and_dotted_path_drop_in():
    assert {
        "ResponseDataset",
        "openai_format",
        "squad",
        "open_assistant",
        "OpenMathInstruct-2",
        "tulu3_sft_mixture",
        "gsm8k",
    } <= set(DATASETS)
    ds = load_dataset(
        {"dataset_name": f"{__name__}.MyDataset", "n": 3, "processor": "sft_processor"}
    )
    assert (
        len(rows_of(ds, "train")) == 3 and rows_of(ds, "train")[0]["_origin"] == "mine[train] row 0"
    )
    with pytest.raises(ValueError, match="Did you mean 'squad'"):
        resolve_class("sqaud")


def test_relative_prompt_file_falls_back_to_sftkit_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # NeMo RL recipes name examples/prompts/math.txt
    spec = TaskDataSpec("math", prompt_file="examples/prompts/math.txt")
    assert spec.prompt is not None  # one {} placeholder; `\boxed{{}}` is literal braces
    assert [f for _, f, _, _ in string.Formatter().parse(spec.prompt) if f is not None] == [""]
    row = spec.apply({"messages": [{"role": "user", "content": "1+1"}]})
    assert "\n\n1+1\n" in row["messages"][0]["content"]
    (tmp_path / "examples" / "prompts").mkdir(parents=True)
    (tmp_path / "examples" / "prompts" / "math.txt").write_text("Q: {}")  # cwd wins
    assert TaskDataSpec("math", prompt_file="examples/prompts/math.txt").prompt == "Q: {}"
    with pytest.raises(ValueError, match=r"prompt_file='nope.txt': file not found \(.*nope.txt or"):
        TaskDataSpec("math", prompt_file="nope.txt")


def test_shipped_nemo_rl_prompt_is_announced_once_and_asks_for_boxed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """sftkit's math.txt is its own wording of NeMo RL's: the run says so once and names
    what to point at; the answer goes in \\boxed{} as NeMo RL's prompt and its verifier ask."""
    import sftkit.data.datasets.base as base

    monkeypatch.setattr(base, "_announced", set())
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="sftkit"):
        specs = [TaskDataSpec("math", prompt_file="examples/prompts/math.txt") for _ in range(2)]
        specs.append(TaskDataSpec("math", prompt_file=str(base.REPO / "examples/prompts/math.txt")))
    lines = [r.getMessage() for r in caplog.records if "copy of NeMo RL's prompt" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "prompt_file examples/prompts/math.txt" in lines[0]
    assert "NeMo RL checkout's examples/prompts/math.txt" in lines[0]
    question = specs[0].apply({"messages": [{"role": "user", "content": "1+1"}]})
    assert "inside \\boxed{}." in question["messages"][0]["content"]
    caplog.clear()
    (tmp_path / "mine.txt").write_text("Q: {}")  # the user's own file: nothing to say
    with caplog.at_level(logging.INFO, logger="sftkit"):
        TaskDataSpec("math", prompt_file="mine.txt")
    assert not caplog.records
