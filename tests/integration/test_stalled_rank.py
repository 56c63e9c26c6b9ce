"""Every wait has a bound: a rank stopped with SIGSTOP ends the job within
`cluster.collective_timeout_s`, with one line naming the stalled rank (before: the other rank
waited for torch's 30-minute gloo default and its error named neither)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SmallRun

from sftkit.lifecycle.stall import STOP_ENV


@pytest.mark.slow
def test_a_stopped_rank_is_named_within_the_timeout(small_run: SmallRun, tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = small_run.subprocess(
        tmp_path,
        "cluster.gpus_per_node=2",
        "policy.train_micro_batch_size=4",
        "sft.max_num_steps=6",
        "cluster.collective_timeout_s=5",
        env=small_run.env(**{STOP_ENV: "1@3"}),
        timeout=240,
    )
    elapsed = time.monotonic() - t0
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "stalled:" in line]
    assert lines, result.stderr[-3000:]
    assert "rank 1 (host " in lines[0] and "last seen at step 3 (train)" in lines[0]
    assert "rank(s) 0 waited" in lines[0]
    assert "cluster.collective_timeout_s=5" in lines[0]
    # 5 s timeout + 5 s grace + the launcher's 30 s SIGTERM-then-SIGKILL of the stopped
    # rank, minutes under load: far below torch's 30-minute default.
    assert elapsed < 600
