"""Context parallelism on CPU (gloo): each sequence split over C ranks gives the same
per-step loss and final weights as one process, padded and packed, and its checkpoint
resumes on another CP size. Tiny runs (the small model, 4 steps) to keep them fast."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import RunResult, SmallRun
from test_distributed import COMMON, assert_same_losses, assert_same_weights

pytestmark = pytest.mark.slow

STEPS = 4
SHORT = ("checkpointing.save_period=0", f"sft.max_num_steps={STEPS}", "sft.val_period=2")
PACKED = ("policy.sequence_packing.enabled=true", "policy.sequence_packing.train_mb_tokens=128")


def run(small_run: SmallRun, work: Path, ranks: int, *more: str) -> RunResult:
    if ranks == 1:
        result = small_run.inprocess(work, *COMMON, *SHORT, *more)
        assert result.returncode == 0
        return result
    launch = (f"cluster.gpus_per_node={ranks}",)
    result = small_run.subprocess(work, *COMMON, *SHORT, *launch, *more, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_run(one: RunResult, other: RunResult) -> None:
    assert_same_losses(one, other, list(range(1, STEPS + 1)))
    for step, value in one.val_rows().items():
        assert abs(other.val_rows()[step] - value) <= 1e-5 * value
    assert_same_weights(one.checkpoint_dir / "final_hf", other.checkpoint_dir / "final_hf")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cp2_matches_one_rank(small_run: SmallRun, tmp_path: Path, layout: str) -> None:
    more = PACKED if layout == "packed" else ()
    one = run(small_run, tmp_path / "one", 1, *more)
    cp = run(small_run, tmp_path / "cp2", 2, "policy.dtensor_cfg.context_parallel_size=2", *more)
    assert_same_run(one, cp)


def test_cp4_packed_and_resume_on_cp2(small_run: SmallRun, tmp_path: Path) -> None:
    """CP=4 (4 ranks, packed rows) matches one process; its step-2 checkpoint resumes with
    CP=2 x DP=1 and logs the same steps 3-4 (CP size changes like the DP size does)."""
    one = run(small_run, tmp_path / "one", 1, *PACKED)
    save = ("checkpointing.save_period=2",)
    cp4 = run(small_run, tmp_path / "cp4", 4, "policy.dtensor_cfg.context_parallel_size=4",
              *PACKED, *save)  # fmt: skip
    assert_same_run(one, cp4)
    work = tmp_path / "resume"
    shutil.copytree(cp4.work, work)
    for name in ("step_4", "final_hf"):
        shutil.rmtree(work / "ckpt" / name)
    resumed = run(small_run, work, 2, "policy.dtensor_cfg.context_parallel_size=2",
                  *PACKED, *save)  # fmt: skip
    assert "Resumed from" in resumed.stderr
    assert_same_losses(one, resumed, [3, 4])
