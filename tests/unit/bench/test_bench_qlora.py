"""bench/qlora.py: its tiny mode trains the quick start with a dense and an NF4 base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_module import ROOT


@pytest.mark.slow  # two training runs as real processes
def test_tiny_mode_compares_dense_and_nf4_validation_losses(tmp_path: Path) -> None:
    out = tmp_path / "qlora.jsonl"
    argv = [sys.executable, "bench/qlora.py", "--tiny", "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    dense, nf4, summary = [json.loads(line) for line in out.read_text().splitlines()]
    assert (dense["case"], nf4["case"]) == ("dense", "nf4")
    assert dense["final_val_loss"] != nf4["final_val_loss"]  # the NF4 base is not the dense one
    gap = abs(nf4["final_val_loss"] / dense["final_val_loss"] - 1)
    assert summary["relative_gap"] == pytest.approx(gap) and summary["within_5_percent"]
