"""A stateful part registered with the Checkpointer (and nothing else changed) is saved,
listed in the manifest, and resumed bit-exact after the process is SIGKILLed mid-save."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.checkpointer import pick_resume_dir
from sftkit.checkpoint.safe_load import load_state_file
from sftkit.dist import DistEnv

HELPER = Path(__file__).with_name("counter_part.py")


def helper_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("counter_part", HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_registered_counter_survives_sigkill_bit_exact(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    work, records = tmp_path / "ckpt", tmp_path / "records"
    env = {**os.environ, ckpt.FAULT_ENV: "manifest_tmp@3"}  # killed while saving step 3
    args = [sys.executable, str(HELPER), str(tiny_model_dir), str(work), str(records), "3"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (records / "counter_3.pt").is_file()  # step 3 ran, its save did not finish

    latest = ckpt.latest_checkpoint(work)
    assert latest == work / "step_2"
    manifest = json.loads((latest / ckpt.MANIFEST).read_text())
    assert "counter" in manifest["parts"] and "train_state" in manifest["parts"]
    assert "state/counter.pt" in manifest["files"]

    helper = helper_module()
    checkpointer, counter = helper.build(tiny_model_dir, work)
    checkpointer.resume_dir, _ = pick_resume_dir(
        checkpointer.cfg.checkpointing, helper.FINGERPRINT, DistEnv()
    )
    state = checkpointer.load()
    expected = load_state_file(records / "counter_2.pt")
    assert state.step == 2 and state.consumed_samples == 4
    assert counter.count == 2
    assert counter.values.dtype == torch.float64
    assert torch.equal(counter.values, expected["values"])
    assert not torch.equal(counter.values, load_state_file(records / "counter_3.pt")["values"])
