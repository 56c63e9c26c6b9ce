"""bench/moe.py runs end to end in its tiny CPU mode, and its sides compute the same loss."""

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


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("moe")


@pytest.mark.slow  # the bench driver: one subprocess per case
def test_tiny_driver_writes_results(tmp_path: Path, bench: ModuleType) -> None:
    out = tmp_path / "moe.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe.py"), "--tiny", "--out", str(out),
         "--cases", "sftkit_lora", "peft_lora"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["case"]) for r in rows] == [
        ("tiny-qwen3-moe", "sftkit_lora"), ("tiny-qwen3-moe", "peft_lora"),
        ("tiny-gpt-oss", "sftkit_lora"), ("tiny-gpt-oss", "peft_lora"),
    ]  # fmt: skip
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0 and r["mfu"] is None  # CPU: no peak
        assert all(math.isfinite(x) for x in r["losses"])
    assert "| tiny-gpt-oss | peft_lora | grouped_mm | 1 |" in bench.summarize(out)


def test_sides_start_from_the_same_loss_and_count_active_flops(bench: ModuleType) -> None:
    pytest.importorskip("peft")
    first = {}
    for name in ("sftkit_lora", "peft_eager_lora", "hf_full"):
        [case] = [c for c in bench.tiny_cases([name]) if c["model"] == "tiny-qwen3-moe"]
        r = bench.run_case(dict(case, warmup=0, steps=1))
        assert r["mb"] == 1 and r["tokens_per_s"] > 0, r
        first[name] = r["first_loss"]
        # 2 layers x (q, o 64 x 64, k, v 64 x 32, router 8 x 64, 2 of 8 experts 3 x 64 x 32)
        # + head 512 x 64
        layer = 2 * 64 * 64 + 2 * 64 * 32 + 8 * 64 + 2 * 3 * 64 * 32
        assert r["active_params"] == 2 * layer + 512 * 64
        assert r["flops_per_token"] > (4 if name.endswith("lora") else 6) * r["active_params"]
    assert r["experts"] == "grouped_mm"
    # Same random weights, tokens and documents, B = 0: every side starts from one loss.
    assert first["sftkit_lora"] == pytest.approx(first["peft_eager_lora"], rel=1e-5)
    assert first["sftkit_lora"] == pytest.approx(first["hf_full"], rel=1e-5)
    assert first["sftkit_lora"] == pytest.approx(math.log(512), abs=0.5)
