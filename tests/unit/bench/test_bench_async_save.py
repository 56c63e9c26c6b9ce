"""bench/async_save.py runs both modes end to end in its tiny mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_module import load_bench


@pytest.mark.slow  # two training runs with saves: half a minute on 2 cores
def test_tiny_mode_measures_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "async_save.jsonl"
    load_bench("async_save").main(["--tiny", "--out", str(out)])
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["async", "sync"]
    for row in rows.values():
        assert row["step_s"] > 0 and row["save_pause_s"] > 0 and row["during_ratio"] > 0
