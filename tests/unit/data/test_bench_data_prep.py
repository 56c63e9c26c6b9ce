"""bench/data_prep.py --tiny: both preparation paths run on the same rows and are timed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench" / "data_prep.py"


@pytest.mark.slow
def test_tiny_mode_runs_both_sides(capsys: pytest.CaptureFixture[str]):
    spec = importlib.util.spec_from_file_location("data_prep_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    result = module.main(["--tiny"])
    assert result["num"] == 300
    assert result["trl_samples_per_s"] > 0 and result["sftkit_samples_per_s"] > 0
    assert "ratio" in capsys.readouterr().out
