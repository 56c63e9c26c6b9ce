"""A stop signal at a step whose validation is due: save first, skip the validation, and the
resumed run runs it before its first step (a long validation outlasted the grace period:
162 s to exit after SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from sftkit.errors import EXIT_REQUEUE


def test_sigterm_before_a_due_validation_saves_first(
    small_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sftkit.train.loop as loop

    real = loop.train_step

    def signalled_at_step_3(*args, **kwargs):  # type: ignore[no-untyped-def]
        if args[-1] == 3:  # the step number: SIGTERM arrives while step 3 trains
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", signalled_at_step_3)
    with caplog.at_level("WARNING", logger="sftkit"):
        stopped = small_run.inprocess(tmp_path, "sft.val_period=3", "sft.max_num_steps=4")
    assert stopped.returncode == EXIT_REQUEUE
    assert max(stopped.train_rows()) == 3 and stopped.val_rows() == {}
    assert "Skipping the validation due at step 3" in caplog.text
    info = json.loads((tmp_path / "ckpt" / "step_3" / "training_info.json").read_text())
    assert info["validation_due"] is True

    monkeypatch.undo()
    resumed = small_run.inprocess(tmp_path, "sft.val_period=3", "sft.max_num_steps=4")
    assert resumed.returncode == 0
    assert list(resumed.val_rows()) == [3]  # the skipped one, before step 4
    assert sorted(resumed.train_rows()) == [4]
