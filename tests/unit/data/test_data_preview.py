"""The preview entry point: terminal highlighting and the `--json` contract.

The contract: JSONL only on stdout (logs go to stderr), one object per example with
`input_ids`, `tokens` (`tokenizer.decode([id])` per id), `loss_mask` (1 where token i is a
trained target), `length`, `truncated` and `dropped` (null or the reason).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from sftkit.data.preview import main


@pytest.fixture
def config(tmp_path: Path, tokenizer_dir: Path) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(
        "policy:\n"
        f"  model_name: {tokenizer_dir}\n"
        "  max_total_sequence_length: 2048\n"
        "  tokenizer:\n"
        "    chat_template: default\n"
        "data:\n"
        f"  cache_dir: {tmp_path / 'cache'}\n"
        "  train:\n"
        "    dataset_name: openai_format\n"
        f"    data_path: {FIXTURES / 'data' / 'tools_heterogeneous.jsonl'}\n"
        "  validation: null\n"
    )
    return path


def test_json_lines_only_on_stdout(config: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--config", str(config), "--num", "2", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert {"input_ids", "tokens", "loss_mask", "length", "truncated", "dropped"} <= set(record)
        assert (
            record["length"]
            == len(record["input_ids"])
            == len(record["tokens"])
            == len(record["loss_mask"])
        )
        assert record["dropped"] is None and record["truncated"] is False
        trained = "".join(
            t for t, m in zip(record["tokens"], record["loss_mask"], strict=True) if m
        )
        assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained


def test_terminal_view_marks_trained_text(config: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--config", str(config), "--num", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- example 0" in out and "[[It is sunny.<|im_end|>]]" in out  # not a tty: brackets
    assert (
        main(
            [
                "--config",
                str(config),
                "--num",
                "1",
                "--json",
                "data.max_input_seq_length=40",
                "data.overlong_policy=mask",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["truncated"] and record["length"] == 40 and not any(record["loss_mask"])


def test_bad_data_is_one_line_and_exit_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftkit.cli import main as cli_main

    broken = tmp_path / "broken.jsonl"
    good = (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    )
    broken.write_text(good + "\n{not json\n")  # rows stream: the first bad line is reported
    code = cli_main(["preview", "--config", str(config), f"data.train.data_path={broken}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("Error: ") and "broken.jsonl:2: malformed JSON" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    assert cli_main(["preview", "--config", str(config), "data.trian=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("Config error: ")
