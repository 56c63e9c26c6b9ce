"""bf16 parameters with stochastic rounding or Kahan updates through the real entry point:
the parameters stay bf16, the run learns, and stopping and resuming changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from test_resume import EXACT

pytestmark = pytest.mark.slow

BF16 = ("policy.precision=bfloat16", "policy.dtensor_cfg.bf16_params=true")


@pytest.mark.parametrize("rounding", ["stochastic_rounding", "kahan"])
def test_bf16_update_trains_and_resumes_bit_exact(small_run, tmp_path: Path, rounding: str) -> None:
    update = f"policy.dtensor_cfg.bf16_params_update={rounding}"
    whole = small_run.inprocess(tmp_path / "whole", *BF16, update, "sft.max_num_steps=6")
    part = small_run.inprocess(tmp_path / "part", *BF16, update, "sft.max_num_steps=3")
    resumed = small_run.inprocess(tmp_path / "part", *BF16, update, "sft.max_num_steps=6")
    assert whole.returncode == part.returncode == resumed.returncode == 0
    ref, got = whole.train_rows(), resumed.train_rows()
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert {n: got[step][n] for n in EXACT} == {n: ref[step][n] for n in EXACT}, step
    assert ref[6]["train/loss"] < ref[1]["train/loss"]
    weights = whole.checkpoint_dir / "step_6" / "policy" / "weights" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


@pytest.mark.heavy  # several ranks on 2 cores: minutes; `uv run --group dev pytest -m heavy`
def test_stochastic_rounding_under_fsdp2_resumes_bit_exact(small_run, tmp_path: Path) -> None:
    """Two ranks (FSDP2 shards, DTensor parameters and moments, a rounding stream per rank):
    the sharded step_3 checkpoint continues exactly as the uninterrupted run."""
    import shutil

    from test_distributed import two_ranks

    update = "policy.dtensor_cfg.bf16_params_update=stochastic_rounding"
    whole = two_ranks(small_run, tmp_path / "whole", *BF16, update)
    work = tmp_path / "resume"
    shutil.copytree(whole.work / "ckpt" / "step_3", work / "ckpt" / "step_3")
    resumed = two_ranks(small_run, work, *BF16, update)
    ref, got = whole.train_rows(), resumed.train_rows()
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert {n: got[step][n] for n in EXACT} == {n: ref[step][n] for n in EXACT}, step
    assert ref[6]["train/loss"] < ref[1]["train/loss"]
