"""Progress lines on the long checkpoint passes: verifying (hashing) at resume, loading the
parts, exporting; quiet below `manifest.PROGRESS_BYTES` (a small checkpoint takes seconds)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_checkpoint_checkpointer import ENV, FINGERPRINT, checkpointer

from sftkit.checkpoint import checkpointer as checkpointer_module
from sftkit.checkpoint import export, manifest
from sftkit.checkpoint.checkpointer import pick_resume_dir
from sftkit.checkpoint.state import TrainState


@pytest.mark.parametrize("large", [False, True], ids=["small-quiet", "large-logged"])
def test_resume_and_export_log_progress_when_large(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, large: bool,
) -> None:  # fmt: skip
    c = checkpointer(tiny_model_dir, tmp_path / "ckpt", 0)
    c.save(TrainState(step=1))
    if large:  # the tiny checkpoint stands for one over the threshold
        for module in (manifest, checkpointer_module, export):
            monkeypatch.setattr(module, "PROGRESS_BYTES", 0)
    fresh = checkpointer(tiny_model_dir, tmp_path / "ckpt", 1)
    with caplog.at_level(logging.INFO, logger="sftkit"):
        fresh.resume_dir, _ = pick_resume_dir(fresh.cfg.checkpointing, FINGERPRINT, ENV)
        fresh.load()
        export.export_checkpoint(fresh.resume_dir, tmp_path / "hf")
    lines = [r.getMessage() for r in caplog.records]
    for desc in ("verifying step_1", "loading step_1", "exporting step_1"):
        shown = [line for line in lines if line.startswith(f"{desc}: ")]
        assert bool(shown) == large, (desc, lines)
        if large:
            assert any("%" in line and "eta" in line for line in shown), shown
