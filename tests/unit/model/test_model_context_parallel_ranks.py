"""Context parallelism on 2 gloo ranks without FSDP: the loss and every gradient equal one
process's, and each rank saves <= 0.6x the bytes for backward at 4096 tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("cp_worker.py")


@pytest.mark.slow
def test_cp2_gradients_and_saved_bytes(tmp_path: Path) -> None:
    out = tmp_path / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), str(out), "4096"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert abs(result["loss"] - result["ref_loss"]) <= 1e-5 * result["ref_loss"]
    for name, grad in result["grads"].items():
        ref = result["ref_grads"][name]
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    ratios = [b / result["ref_bytes"] for b in result["bytes"]]
    assert max(ratios) <= 0.6, ratios  # measured 0.52 and 0.55 (torch 2.15)
