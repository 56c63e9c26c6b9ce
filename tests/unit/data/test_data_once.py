"""Preparing the data once (`sftkit/data/once.py`): one process tokenizes, the others wait
for its entry (bounded, logged) and map it; a preparer's error stops every rank with its
message. The two-rank runs are real gloo process groups (`once_rank.py`, `slow`)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sftkit.data import once
from sftkit.data.once import PrepareFailed, PrepareGroup
from sftkit.errors import RunFailure

WORKER = Path(__file__).with_name("once_rank.py")


def _write_rows(path: Path, n: int, bad_line: int | None = None) -> None:
    with path.open("w") as f:
        for i in range(n):
            if i == bad_line:
                f.write("{not json\n")
                continue
            messages = [
                {"role": "user", "content": f"What is {i} + 30?"},
                {"role": "assistant", "content": f"It is {i + 30}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def _two_ranks(tmp_path: Path, data: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    args = [str(port), str(data), str(tmp_path / "cache"), str(out)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", *args]) for rank in (0, 1)
    ]
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_ranks_tokenize_once_and_both_map_the_entry(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    _write_rows(data, 200)
    first, second = _two_ranks(tmp_path, data)
    assert first["examples"] == second["examples"] == 200, (first, second)
    assert first["batches"] >= 1 and second["batches"] == 0  # only local rank 0 tokenized


@pytest.mark.slow
def test_a_preparer_error_stops_every_rank_with_its_message(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    _write_rows(data, 50, bad_line=7)
    first, second = _two_ranks(tmp_path, data)
    assert "d.jsonl:8" in first["error"], first
    assert first["error"].split(": ", 1)[1] in second["error"], (first, second)
    assert "reported by local rank 0" in second["error"]
    assert second["seconds"] < 60  # told at once, not after data.prepare_timeout_s=120


class _Store:
    """The part of torch.distributed's key-value store that `PrepareGroup` uses."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self.values for k in keys)

    def get(self, key: str) -> bytes:
        return self.values[key]

    def add(self, key: str, amount: int) -> int:
        value = int(self.values.get(key, b"0")) + amount
        self.values[key] = str(value).encode()
        return value


def _pair(timeout_s: float = 5.0) -> tuple[PrepareGroup, PrepareGroup]:
    store = _Store()
    return (
        PrepareGroup(store, "k", True, "rank 0", timeout_s, waiters=0),
        PrepareGroup(store, "k", False, "rank 0", timeout_s),
    )


def test_one_process_prepares_alone() -> None:
    assert PrepareGroup.of(None, "node", 10.0) is None


@pytest.mark.parametrize(
    ("error", "raised"),
    [(ValueError("bad row"), PrepareFailed), (RunFailure("disk full"), RunFailure),
     (KeyError("bug"), RuntimeError)],
)  # fmt: skip
def test_the_waiting_rank_raises_the_preparer_s_error_with_its_exit_code(
    error: Exception, raised: type[Exception]
) -> None:
    preparer, waiter = _pair()
    preparer.failed(error)
    with pytest.raises(raised, match="reported by rank 0, which prepared the data") as info:
        waiter.wait()
    assert str(error).strip("'") in str(info.value)
    assert type(info.value) is raised


def test_the_wait_is_bounded_logged_and_names_the_key(monkeypatch, caplog) -> None:
    monkeypatch.setattr(once, "POLL_S", 0.01)
    monkeypatch.setattr(once, "LOG_EVERY_S", 0.02)
    _, waiter = _pair(timeout_s=0.2)
    with caplog.at_level(logging.INFO, "sftkit"), pytest.raises(TimeoutError) as info:
        waiter.wait()
    assert "data.prepare_timeout_s=0.2" in str(info.value)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("waiting for rank 0 to prepare the data")
    assert any(line.startswith("still waiting for rank 0") for line in lines)


def test_the_waiting_rank_gets_the_entry() -> None:
    preparer, waiter = _pair()
    preparer.done("abc123")
    assert waiter.wait() == "abc123"
