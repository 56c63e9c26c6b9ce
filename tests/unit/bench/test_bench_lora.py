"""bench/lora.py runs end to end in its tiny CPU mode, and its sides compute the same loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from bench_module import load_bench

ROOT = Path(__file__).resolve().parents[3]
BENCH = ROOT / "bench" / "lora.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("lora")


@pytest.mark.slow  # 30 s: the bench driver
def test_tiny_driver_writes_results(tmp_path: Path, bench: ModuleType) -> None:
    # The real driver: one case in its own subprocess, appended to the JSONL when done.
    out = tmp_path / "lora.jsonl"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--out", str(out), "--cases", "sftkit_lora"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    [r] = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in r, r
    assert r["case"] == "sftkit_lora" and r["mb"] == 2 and set(r["tried"]) == {"1", "2"}
    assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0
    assert all(math.isfinite(x) for x in r["losses"])
    assert "| tiny | sftkit_lora | 2 |" in bench.summarize(out)


def test_sides_start_from_the_same_loss(bench: ModuleType) -> None:
    pytest.importorskip("peft")
    first = {}
    for name in ("sftkit_lora", "peft_lora", "sftkit_full"):
        case = dict(bench.tiny_cases([name])[0], mbs=[1], steps=1)
        r = bench.run_case(case)
        assert r["mb"] == 1 and r["tokens_per_s"] > 0, r
        first[name] = r["first_loss"]
        lora = name.endswith("lora")
        assert r["flops_per_token"] > (4 if lora else 6) * 2 * (4 * 64 * 64 + 3 * 64 * 128)
    # Same random weights and tokens, B = 0: every side starts from the same loss (~ln 512).
    assert first["sftkit_lora"] == pytest.approx(first["peft_lora"], abs=2e-2)
    assert first["sftkit_lora"] == pytest.approx(first["sftkit_full"], abs=2e-2)
    assert first["sftkit_lora"] == pytest.approx(math.log(512), abs=0.5)
