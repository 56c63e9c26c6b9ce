"""bench/max_context.py: the fit/predict arithmetic, the summary, and the tiny CPU mode."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from bench_module import load_bench


@pytest.fixture(scope="module")
def max_context() -> ModuleType:
    return load_bench("max_context")


def test_fit_predict_and_back_off(max_context: ModuleType) -> None:
    # 10 GiB fixed plus 1 MiB per token, measured at three lengths
    points = [(n, 10 * 2**30 + n * 2**20) for n in (4096, 8192, 16384)]
    a, b = max_context.fit_line(points)
    assert math.isclose(a, 10 * 2**30) and math.isclose(b, 2**20)
    budget = 100 * 2**30  # room for 90 GiB of tokens: 92160, a multiple of 256
    assert max_context.predict_length(a, b, budget, 256, 1 << 30) == 92160
    assert max_context.predict_length(a, b, budget + 300 * 2**20, 256, 1 << 30) == 92160 + 256
    assert max_context.predict_length(a, b, budget, 256, 65536) == 65536  # capped
    assert max_context.predict_length(a, b, 2**30, 256, 65536) == 0  # not even the fixed part
    assert max_context.predict_length(5.0, 0.0, 10.0, 16, 4096) == 4096  # flat: the cap
    # noisy points: least squares, not the two ends
    a, b = max_context.fit_line([(1, 2.0), (2, 4.5), (3, 6.0)])
    assert math.isclose(b, 2.0) and math.isclose(a, 0.1666666, rel_tol=1e-5)
    with pytest.raises(ValueError, match="two different lengths"):
        max_context.fit_line([(8, 1.0), (8, 2.0)])
    assert max_context.back_off(92160, 256) == 82944  # 90%, rounded down to 256
    assert max_context.back_off(100, 16) == 80


def test_summary_ratio_and_target(max_context: ModuleType) -> None:
    records = [
        {"case": "8b_lora", "side": "sftkit", "verified_len": 131072, "predicted_len": 300000,
         "capped": True},
        {"case": "8b_lora", "side": "hf", "verified_len": 40960, "predicted_len": 41000},
        {"case": "1b_full", "side": "sftkit", "verified_len": 60000, "predicted_len": 60000},
        {"case": "1b_full", "side": "hf", "skipped": "peft is not installed"},
    ]  # fmt: skip
    s = max_context.summarize(records)
    assert s["8b_lora_sftkit_over_hf"] == 3.2 and s["8b_lora_target_met"] is True
    assert s["8b_lora_capped"] is True and s["8b_lora_predicted_sftkit_over_hf"] == 7.317
    assert not any(k.startswith("1b_full") for k in s)


@pytest.mark.slow  # starts one process per case (60 s)
def test_tiny_mode_writes_a_record_per_case(tmp_path: Path, max_context: ModuleType) -> None:
    out = tmp_path / "max_context.jsonl"
    records = max_context.main(["--tiny", "--models", "8b_lora", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    env, ours, hf, summary = records
    assert env["device"] == "cpu" and env["measured_lengths"] == [64, 128, 256]
    for r in (ours, hf):
        assert "error" not in r, r
        assert r["memory"] == "cpu_proxy_saved_bytes_on_device" and r["shape"] == "tiny"
        assert (
            list(r["measured_mib"]) == ["64", "128", "256"] and r["fit_mib"]["b_per_1k_tokens"] > 0
        )
        assert r["verified_len"] % 16 == 0 and r["verified_len"] <= r["predicted_len"]
        assert r["peak_mib"] <= r["budget_mib"] and r["tokens_per_s"] > 0
        assert abs(r["first_loss"] - math.log(512)) < 0.2  # same random model and tokens
    assert "liger" in hf  # Liger needs CUDA: HF ran without it and says so
    assert (ours["ac"], ours["offload"]) == ("full", True) and "ac" not in hf
    # Checkpointing with offload and the chunked loss keep far less per token on the device
    # than HF's checkpointed layers with full logits.
    assert summary["8b_lora_sftkit_over_hf"] >= 2 and summary["8b_lora_target_met"] is True
