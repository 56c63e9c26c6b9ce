"""Staged SFT (`checkpointing.resume_mismatch=stage`): a second stage on new data continues
the weights, optimizer, LR schedule, step counter and exp_NNN; the data starts at epoch 0;
`sft.max_num_steps` counts the whole run (NeMo RL's choice)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import read_metrics, rows_by_step, write_addition_data


def test_two_stage_run(small_run, tmp_path: Path) -> None:
    first = small_run.inprocess(tmp_path, "sft.max_num_steps=3")
    assert first.returncode == 0
    stage_two = write_addition_data(tmp_path / "stage2.jsonl", rows=200, seed=5)
    new_data = (f"data.train.data_path={stage_two}", "sft.max_num_steps=5")
    refused = small_run.inprocess(tmp_path, *new_data)
    assert refused.returncode == 2  # the default still refuses new data
    second = small_run.inprocess(tmp_path, *new_data, "checkpointing.resume_mismatch=stage")
    assert second.returncode == 0
    rows = rows_by_step(read_metrics(first.exp_dir))  # stage two logs into the same exp_NNN
    assert sorted(rows) == [1, 2, 3, 4, 5]  # max_num_steps=5 counts stage one's 3 steps
    info = json.loads((tmp_path / "ckpt" / "step_5" / "training_info.json").read_text())
    assert info["step"] == 5 and info["epoch"] == 0
    assert (
        info["fingerprint"]["train_data"]
        != json.loads((tmp_path / "ckpt" / "step_3" / "training_info.json").read_text())[
            "fingerprint"
        ]["train_data"]
    )
