"""bench/data_prep.py --tiny: both preparation paths run on the same rows, are timed, and agree."""

from __future__ import annotations

import pytest
from bench_module import load_bench


@pytest.mark.slow
def test_tiny_mode_runs_both_sides(capsys: pytest.CaptureFixture[str]):
    module = load_bench("data_prep")
    result = module.main(["--tiny"])
    assert result["num"] == 300
    assert result["trl_samples_per_s"] > 0 and result["sftkit_samples_per_s"] > 0
    # both sides train the same tokens of the same ids, through sftkit's fast paths
    assert result["identical"] == 300
    assert result["span_fallbacks"] == result["offset_fallbacks"] == 0
    assert "ratio" in capsys.readouterr().out
