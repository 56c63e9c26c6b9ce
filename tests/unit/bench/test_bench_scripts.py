"""bench/sft_gpu.py and bench/cpu_vs_trl.py run end to end in their tiny CPU modes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from bench_module import load_bench

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def sft_gpu() -> ModuleType:
    return load_bench("sft_gpu")


def _records(path: Path) -> dict[tuple[str, str | None], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["case"], r.get("mode")): r for r in rows}


def test_rows_are_full_and_documents_isolated(sft_gpu: ModuleType) -> None:
    setup = sft_gpu.TINY
    rows = sft_gpu.make_rows(setup, 6, seed=3)
    for row in rows:
        assert sum(len(ids) for ids, _ in row) == setup.seq  # no padding: same tokens for all
        for ids, mask in row:
            assert len(ids) == len(mask) and mask[: int(0.3 * len(ids))] == [0] * int(
                0.3 * len(ids)
            )
    batches = sft_gpu.step_batches(setup, seed=3)
    assert len(batches) == setup.warmup + setup.steps
    for b in batches:
        assert tuple(b.input_ids.shape) == (setup.rows, setup.seq)
        assert int(b.cu_seqlens[-1]) == setup.rows * setup.seq
    assert 1 < sft_gpu.attention_context(batches) < setup.seq
    full = sft_gpu.step_batches(sft_gpu.replace(setup, docs="full"), seed=3)
    assert sft_gpu.attention_context(full) == setup.seq
    assert all(b.num_target_tokens == setup.rows * (setup.seq - 1) for b in full)


@pytest.mark.slow
def test_tiny_inline_run_writes_every_case(tmp_path: Path, sft_gpu: ModuleType) -> None:
    out = tmp_path / "sft_gpu.jsonl"
    sft_gpu.main(["--tiny", "--inline", "--modes", "bf16,fp32_master", "--steps", "1",
                  "--out", str(out)])  # fmt: skip
    got = _records(out)
    assert got[("environment", None)]["tokens_per_step"] == 2 * 256
    assert "CUDA" in got[("liger", "bf16")]["skipped"]
    for mode in ("bf16", "fp32_master"):
        hf, ours = got[("hf", mode)], got[("sftkit", mode)]
        assert "error" not in ours and "error" not in hf, (hf, ours)
        assert hf["tokens_per_s"] > 0 and ours["tokens_per_s"] > 0
        assert ours["attention"] == "segments" and ours["fused"] == []
        # Same tokens and targets, near-uniform random model: both losses ~ ln(vocab). HF
        # attends across documents, so they agree only approximately.
        assert abs(hf["first_loss"] - math.log(512)) < 0.2
        assert abs(ours["first_loss"] - hf["first_loss"]) < 0.05
    summary = got[("summary", None)]
    assert summary["bf16_sftkit_over_hf"] > 0 and "bf16_target_met" not in summary


@pytest.mark.slow  # runs the bench driver
def test_tiny_recipe_setting_accumulates_the_largest_micro_batch(
    tmp_path: Path, sft_gpu: ModuleType
) -> None:
    out = tmp_path / "recipe.jsonl"
    sft_gpu.main(["--tiny", "--inline", "--setting", "recipe", "--modes", "bf16",
                  "--cases", "hf,sftkit,sftkit_sr", "--out", str(out)])  # fmt: skip
    got = _records(out)
    assert got[("environment", None)]["tokens_per_step"] == 8 * 256
    assert got[("environment", None)]["setting"] == "recipe"
    for case in ("hf", "sftkit", "sftkit_sr"):
        record = got[(case, "bf16")]
        assert "error" not in record, record
        # 8 rows per step; the tiny setting caps micro-batches at 4 rows: 2 accumulated
        assert (record["micro_rows"], record["grad_accum"]) == (4, 2)
        assert record["tokens_per_s"] > 0 and abs(record["first_loss"] - math.log(512)) < 0.2
    steps = sft_gpu.step_batches(sft_gpu.RECIPE["tiny"], seed=0, micro_rows=4)
    assert len(steps) == 2 and all(len(s) == 2 for s in steps)  # warm-up + 1 measured step
    assert all(tuple(b.input_ids.shape) == (4, 256) for s in steps for b in s)


def test_largest_fitting_micro_batch_backs_off_on_oom(sft_gpu: ModuleType) -> None:
    import torch

    tried, freed = [], []

    def try_step(m: int) -> None:
        tried.append(m)
        if m > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")

    setup = sft_gpu.RECIPE["gpu"]
    candidates = sft_gpu.micro_candidates(setup)
    assert candidates == [16, 8, 4, 2, 1]  # divisors of 32 up to 16
    assert sft_gpu.largest_fitting(candidates, try_step, lambda: freed.append(1)) == 2
    assert tried == [16, 8, 4, 2] and len(freed) == 3
    assert sft_gpu.micro_candidates(sft_gpu.replace(setup, micro_rows=8)) == [8]
    with pytest.raises(RuntimeError, match="even at micro-batch 1"):
        sft_gpu.largest_fitting([1], lambda m: try_step(4), lambda: None)


@pytest.mark.slow
def test_failed_case_is_recorded_and_the_run_goes_on(
    tmp_path: Path, sft_gpu: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(case: str, mode: str, setup: object, seed: int, profile: object) -> dict:
        if case == "hf":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"tokens_per_s": 10.0, "peak_gib": 1.0}

    monkeypatch.setattr(sft_gpu, "run_case", boom)
    out = tmp_path / "r.jsonl"
    sft_gpu.main(["--tiny", "--inline", "--modes", "bf16", "--out", str(out)])
    got = _records(out)
    assert got[("hf", "bf16")]["error"].startswith("RuntimeError: CUDA out of memory")
    assert got[("sftkit", "bf16")]["tokens_per_s"] == 10.0
    assert ("summary", None) in got


@pytest.mark.slow
def test_profile_table_per_case(tmp_path: Path, sft_gpu: ModuleType) -> None:
    sft_gpu.main(["--tiny", "--inline", "--modes", "bf16", "--cases", "sftkit,sftkit_torch_ce",
                  "--steps", "1", "--profile", str(tmp_path / "prof"),
                  "--out", str(tmp_path / "r.jsonl")])  # fmt: skip
    for case in ("sftkit", "sftkit_torch_ce"):
        table = (tmp_path / "prof" / f"{case}_bf16.txt").read_text()
        assert "aten::mm" in table and "Self CPU" in table, table[:500]
        assert "GPU idle: no device events" in table  # CPU run: nothing on a device
    summary = _records(tmp_path / "r.jsonl")[("summary", None)]
    assert summary.keys() == {"case", "seconds"}  # no Liger or HF case ran: no ratios


def test_idle_report_finds_the_gaps_between_kernels(sft_gpu: ModuleType) -> None:
    kernels = [(0.0, 10.0), (5.0, 20.0), (50.0, 60.0), (61.0, 70.0), (170.0, 180.0)]
    host = [(0.0, 200.0, "train_step"), (80.0, 160.0, "Optimizer.step"),
            (100.0, 130.0, "aten::stack"), (30.0, 45.0, "aten::item")]  # fmt: skip
    report = sft_gpu.idle_report(kernels, host)
    # Overlapping kernels merge; gaps: 20-50 (30 us), 60-61 (1 us), 70-170 (100 us).
    assert report.splitlines()[0].startswith("GPU idle: 131 us of 180 us (72.8%) in 3 gaps")
    longest, second = report.splitlines()[1:3]
    assert "100 us at +70: aten::stack < Optimizer.step < train_step" in longest
    assert "30 us at +20: aten::item < train_step" in second
    assert "no device events" in sft_gpu.idle_report([], host)


def test_error_line_and_summary(sft_gpu: ModuleType) -> None:
    stderr = (
        "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory\n"
    )
    assert sft_gpu._error_line(stderr) == "torch.OutOfMemoryError: CUDA out of memory"
    records = [
        {"case": "liger", "mode": "bf16", "tokens_per_s": 100.0, "peak_gib": 20.0},
        {"case": "sftkit", "mode": "bf16", "tokens_per_s": 130.0, "peak_gib": 19.0},
        {"case": "liger", "mode": "fp32_master", "tokens_per_s": 100.0, "peak_gib": 20.0},
        {"case": "sftkit", "mode": "fp32_master", "tokens_per_s": 130.0, "peak_gib": 21.0},
    ]
    s = sft_gpu.summarize(records)
    assert s["bf16_sftkit_over_liger"] == 1.3 and s["bf16_target_met"] is True
    assert s["fp32_master_sftkit_memory_over_liger"] == 1.05
    assert s["fp32_master_target_met"] is False


def test_liger_wheel_is_unpacked(tmp_path: Path, sft_gpu: ModuleType) -> None:
    # A stand-in wheel (a zip with the package's layout): .wheels/ is not in git.
    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed in this environment: nothing to unpack")
    assert sft_gpu.liger_dir(tmp_path) is None  # no .wheels/ there
    (tmp_path / ".wheels").mkdir()
    name = f"liger_kernel-0.0.{tmp_path.name[-6:].encode().hex()}-py3-none-any.whl"
    with zipfile.ZipFile(tmp_path / ".wheels" / name, "w") as wheel:
        wheel.writestr("liger_kernel/__init__.py", "")
        wheel.writestr("liger_kernel/ops/rms_norm.py", "# kernel source")
    target = sft_gpu.liger_dir(tmp_path)
    assert target is not None and (target / "liger_kernel" / "ops" / "rms_norm.py").is_file()


@pytest.mark.slow  # 30 s: the bench driver in a subprocess
def test_tiny_subprocess_case(tmp_path: Path, sft_gpu: ModuleType) -> None:
    # The real driver: the case runs in its own interpreter and its line is appended.
    out = tmp_path / "sft_gpu.jsonl"
    sft_gpu.main(["--tiny", "--cases", "sftkit", "--modes", "fp32_master", "--steps", "1",
                  "--out", str(out)])  # fmt: skip
    r = _records(out)[("sftkit", "fp32_master")]
    assert "error" not in r, r
    assert r["tokens_per_s"] > 0 and math.isfinite(r["last_loss"])


@pytest.mark.slow
def test_cpu_vs_trl_tiny(tmp_path: Path) -> None:
    bench = load_bench("cpu_vs_trl")
    out = tmp_path / "trl.jsonl"
    records = bench.main(["--tiny", "--steps", "1", "--threads", "1", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    _, trl, ours, summary = records
    assert trl["side"] == "trl" and ours["side"] == "sftkit"
    assert trl["real_tokens_per_s"] > 0 and ours["real_tokens_per_s"] > 0
    # TRL pads each micro-batch to its longest example; sftkit packs.
    assert trl["padding_fraction"] > 0.3 and ours["padding_fraction"] < 0.05
    # Same examples, model and loss (mean NLL over trained tokens): close losses.
    assert abs(trl["mean_loss"] - ours["mean_loss"]) < 0.05
    ratio = ours["real_tokens_per_s"] / trl["real_tokens_per_s"]
    assert summary["sftkit_over_trl"] == round(ratio, 3)


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_data_scale_tiny_mode_measures_every_case(tmp_path: Path) -> None:
    """bench/data_scale.py --tiny: the real entry point per size, memory sampled over the tree."""
    data_scale = load_bench("data_scale")
    out = tmp_path / "scale.jsonl"
    result = data_scale.main(["--tiny", "--dir", str(tmp_path), "--out", str(out)])
    sizes = [r for r in result["records"] if not r["big_row_mb"]]
    big = [r for r in result["records"] if r["big_row_mb"]]
    assert [r["size_gb"] for r in sizes] == [0.001, 0.002] and len(big) == 1
    for r in result["records"]:
        assert r["peak_rss_anon_mb"] > 50 and r["prep_rows_per_s"] > 0 and r["cache_mb"] > 0
    assert sizes[1]["rows"] > 1.8 * sizes[0]["rows"] and sizes[1]["cache_mb"] > sizes[0]["cache_mb"]
    assert big[0]["rows"] == sizes[0]["rows"] + 1 and big[0]["data_bytes"] > 2**19
    summary = result["summary"]
    assert summary["peak_ratio_largest_over_smallest"] > 0 and summary["peak_ratio_big_row"] > 0
    assert len(out.read_text().splitlines()) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sftkit-data-scale-")]


def test_tree_rss_anon_counts_children() -> None:
    import os
    import subprocess

    data_scale = load_bench("data_scale")
    alone = data_scale.tree_rss_anon_kb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "x = bytearray(200 * 2**20); input()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        import time

        deadline = time.monotonic() + 60
        while data_scale.tree_rss_anon_kb(os.getpid()) < alone + 150 * 1024:
            assert time.monotonic() < deadline, "the child's 200 MB never showed"
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
