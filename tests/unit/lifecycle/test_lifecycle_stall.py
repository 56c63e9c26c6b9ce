"""Naming the stalled rank from the positions ranks leave in the process group's store."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from sftkit.dist import DistEnv
from sftkit.lifecycle import stall


class _FakeEnv(DistEnv):
    @property
    def initialized(self) -> bool:
        return True


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> dist.HashStore:
    shared = dist.HashStore()
    monkeypatch.setattr(stall, "_store", lambda env: shared)
    monkeypatch.setattr(stall, "_GRACE_S", 0.3)
    return shared


def test_the_rank_behind_is_named(store: dist.HashStore) -> None:
    for rank, step in [(0, 4), (1, 3), (2, 4)]:
        stall.report_position(_FakeEnv(rank=rank, world_size=3), step, "train")
    store.set("sftkit/timed_out/2", "1")  # rank 2 also timed out waiting
    line = stall.stall_report(_FakeEnv(rank=0, world_size=3), 30)
    assert line.startswith("stalled: rank 1 (host ")
    assert "last seen at step 3 (train)" in line
    assert "rank(s) 0, 2 waited at step 4" in line
    assert line.endswith("cluster.collective_timeout_s=30 s")


def test_at_one_step_the_rank_that_never_timed_out_is_named(store: dist.HashStore) -> None:
    """All ranks started step 5; the one not waiting in the collective never times out."""
    for rank in range(3):
        stall.report_position(_FakeEnv(rank=rank, world_size=3), 5, "checkpoint save")
    store.set("sftkit/timed_out/1", "1")
    t0 = time.monotonic()
    line = stall.stall_report(_FakeEnv(rank=0, world_size=3), 30)
    assert time.monotonic() - t0 < 5  # the grace period bounds the wait
    assert "rank 2 (host " in line and "(checkpoint save)" in line
    assert "rank 1 (host" not in line and "rank 0 (host" not in line


def test_a_rank_that_never_reported(store: dist.HashStore) -> None:
    stall.report_position(_FakeEnv(rank=0, world_size=2), 0, "setup")
    line = stall.stall_report(_FakeEnv(rank=0, world_size=2), 7)
    assert "rank 1 never reported" in line


def test_one_process_reports_nothing() -> None:
    env = DistEnv()
    stall.report_position(env, 1, "train")  # no store: a no-op
    assert "timed out" in stall.stall_report(env, 5)


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (
            RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"),
            True,
        ),
        (RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(...)"), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("Timed out waiting"), False),
    ],
)
def test_collective_timeouts_are_recognised(err: BaseException, expected: bool) -> None:
    assert stall.is_collective_timeout(err) is expected
