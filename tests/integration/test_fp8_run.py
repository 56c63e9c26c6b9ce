"""FP8 (torchao, emulated on CPU) through the real entry point: trains, saves, resumes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("torchao")
pytestmark = pytest.mark.slow

FP8 = ("policy.precision=bfloat16", "policy.dtensor_cfg.fp8_cfg.enabled=true")


def test_fp8_run_trains_and_resumes(small_run, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="sftkit")
    whole = small_run.inprocess(tmp_path / "whole", *FP8, "sft.max_num_steps=4")
    assert whole.returncode == 0
    # the built-in tiny Llama: 4 decoder layers x 7 linear layers, the head left in bf16
    assert "FP8 (torchao tensorwise, hybrid, emulated" in caplog.text
    assert "28 linear layers; 1 left in the compute dtype (head" in caplog.text
    rows = whole.train_rows()
    assert rows[4]["train/loss"] < rows[1]["train/loss"]
    part = small_run.inprocess(tmp_path / "part", *FP8, "sft.max_num_steps=2")
    resumed = small_run.inprocess(tmp_path / "part", *FP8, "sft.max_num_steps=4")
    assert part.returncode == resumed.returncode == 0
    assert resumed.train_rows()[4]["train/loss"] == rows[4]["train/loss"]
