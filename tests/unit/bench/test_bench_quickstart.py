"""bench/quickstart.py: its verdict on the promise, and its tiny mode end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_module import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("quickstart")


def _run(exact_match: float, wall: float) -> dict:
    return {
        "case": "run",
        "exact_match": exact_match,
        "train_wall_s": wall,
        "train_cpu_s": wall / 2,
    }


def test_promise_needs_every_run_accurate_and_the_median_fast(bench: ModuleType) -> None:
    held = bench.summarize([_run(0.99, 100), _run(0.96, 200), _run(1.0, 150)])
    assert held["promise_held"] and held["median_train_wall_s"] == 150
    assert held["min_exact_match"] == 0.96 and held["median_train_cpu_s"] == 75
    # One run below 95 % breaks it, however good the others are.
    assert not bench.summarize([_run(0.99, 100), _run(0.94, 100), _run(1.0, 100)])["promise_held"]
    # The median training time over 180 s breaks it.
    assert not bench.summarize([_run(1.0, 170), _run(1.0, 190), _run(1.0, 200)])["promise_held"]
    # A failed run (no exact match) breaks it and is counted.
    failed = bench.summarize([_run(1.0, 100), {"case": "run", "train_rc": 1}])
    assert failed["failed"] == 1 and not failed["promise_held"]


@pytest.mark.slow  # the training and eval scripts as real processes
def test_tiny_mode_trains_evaluates_and_summarizes(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "qs.jsonl"
    summary = bench.main(["--tiny", "--seeds", "7", "--out", str(out)])
    rows = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    run, untrained = rows["run"], rows["untrained"]
    assert run["seed"] == 7 and run["threads"] == 1 and run["train_rc"] == 0
    assert run["eval_samples"] == 16 and 0.0 <= run["exact_match"] <= 1.0
    assert run["train_wall_s"] > 0 and run["train_cpu_s"] > 0 and run["eval_cpu_s"] > 0
    # The model as created cannot add: the held-out task is not solved before training.
    assert untrained["exact_match"] == 0.0 and untrained["eval_samples"] == 16
    assert rows["summary"] == summary and summary["runs"] == 1 and summary["failed"] == 0
    assert not summary["promise_held"]  # 2 steps do not learn addition
