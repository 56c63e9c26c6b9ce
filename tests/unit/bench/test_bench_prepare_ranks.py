"""bench/prepare_ranks.py --tiny: 1 and 2 gloo ranks prepare the same rows on cold caches."""

from __future__ import annotations

import pytest
from bench_module import load_bench


@pytest.mark.slow
def test_tiny_mode_measures_one_and_two_ranks() -> None:
    records = load_bench("prepare_ranks").main(["--tiny"])
    assert [r["ranks"] for r in records] == [1, 2]
    assert [len(r["cpu_s_per_rank"]) for r in records] == [1, 2]
    assert all(r["cpu_s_total"] > 0 for r in records)
    assert records[0]["ratio_to_one_rank"] == 1.0 and records[1]["ratio_to_one_rank"] > 0
