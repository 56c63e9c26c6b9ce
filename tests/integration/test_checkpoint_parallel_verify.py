"""Checkpoints are hashed and verified in parallel: W ranks each read about 1/W of a
checkpoint at save and at resume (never the whole of it each), and a corrupted file that
another rank hashed still fails every rank, naming the file (`parallel_verify_worker.py`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("parallel_verify_worker.py")
MB_PER_RANK = 4.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, work: Path) -> list[dict[str, Any]]:
    out = work / "out"
    out.mkdir(parents=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        log = (work / f"rank_{rank}.log").open("w")
        cmd = [sys.executable, str(WORKER), str(work / "ckpt"), str(out), str(MB_PER_RANK)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * world, (work / "rank_0.log").read_text()[-3000:]
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]


def check_shares(records: list[dict[str, Any]], world: int) -> None:
    total = records[0]["checkpoint_bytes"]
    assert total >= world * MB_PER_RANK * 2**20
    for record in records:
        # the target: each rank reads at most its 1/W of the checkpoint + 10% to verify it
        assert record["resume_hashed"] <= total * (1 / world + 0.10), record
        assert record["save_hashed"][1] <= total * (1 / world + 0.10), record
        assert record["alone_hashed"] == total  # what one process hashing all of it reads
    # every byte is hashed once: the shares are disjoint and cover the checkpoint
    assert sum(r["resume_hashed"] for r in records) == total
    # corruption of a file the last rank hashed: every rank skips step_2, naming the file
    for record in records:
        assert record["latest"] == "step_1", record
        assert record["problem"] == f"{record['victim']} does not match its sha256 (corrupted)"


@pytest.mark.slow
def test_two_ranks_each_verify_half_and_agree_on_corruption(tmp_path: Path) -> None:
    check_shares(run_ranks(2, tmp_path), 2)


@pytest.mark.heavy  # several ranks on 2 cores: minutes; `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_four_ranks_each_verify_a_quarter_and_agree_on_corruption(tmp_path: Path) -> None:
    check_shares(run_ranks(4, tmp_path), 4)
