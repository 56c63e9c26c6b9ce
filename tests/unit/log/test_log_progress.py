"""Progress of a long pass: a log line every ~10% with rate and ETA, quiet for short passes."""

from __future__ import annotations

import logging

import pytest

from sftkit.log.progress import Progress, format_amount


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (999, "B", "999 B"),
        (1500, "B", "1.5 KB"),
        (3.2e9, "B", "3.2 GB"),
        (12345, "rows", "12,345 rows"),
    ],
)
def test_format_amount(value: float, unit: str, text: str) -> None:
    assert format_amount(value, unit) == text


def test_logs_every_tenth_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sftkit")
    with Progress("hashing data", total=1000, unit="B", bar=False) as progress:
        for _ in range(100):
            progress.update(10)
    lines = [r.getMessage() for r in caplog.records]
    # 10%, 20%, ..., 90%, then the closing line; never twice for one step of 10%.
    assert [line.split(": ")[1].split("%")[0] for line in lines[:-1]] == [
        str(p) for p in range(10, 100, 10)
    ]
    assert all("/s" in line and "eta" in line for line in lines[:-1])
    assert lines[-1].startswith("hashing data: done, 1.0 KB in ")


def test_short_pass_is_quiet_and_other_ranks_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sftkit")
    with Progress("loading", total=10, bar=False, step_fraction=2.0) as progress:
        progress.update(10)
    with Progress("loading", total=10, bar=False, enabled=False) as progress:
        progress.update(5)
    assert caplog.records == []
    assert progress.n == 5


def test_unknown_total_logs_by_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sftkit")
    progress = Progress("reading", total=None, bar=False, every_s=0.0)
    progress.update(3)
    progress.close(done=False)
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["reading: 3 rows"]
