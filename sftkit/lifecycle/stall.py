"""Naming the rank that stalled a job.

A rank that stops answering (SIGSTOP, a hung filesystem, a wedged device) leaves the others
waiting in their next collective until `cluster.collective_timeout_s`; torch's error then
names the waiting rank, not the stalled one (observed: 2 ranks, one SIGSTOPped, the other
still waiting at 201 s on the default 30-minute gloo timeout, then an error naming neither).

So each rank writes where it is to the process group's key-value store as it goes (one small
`set` per step: `sftkit/where/<rank>` = phase, step, time, host, pid), and a collective that
times out is reported as one line naming the ranks that fell behind:

    stalled: rank 1 (host n3, pid 4242) last seen at step 3 (train), 31 s ago, while rank(s)
    0 waited at step 4; every collective waits at most cluster.collective_timeout_s=30 s
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from sftkit.dist import DistEnv
from sftkit.errors import RunFailure

logger = logging.getLogger("sftkit")

_KEY = "sftkit/where/{rank}"
_TIMED_OUT = "sftkit/timed_out/{rank}"
_READ_TIMEOUT_S = 5.0  # reading the store after a timeout: its host may be the stalled one
STOP_ENV = "SFTKIT_TEST_SIGSTOP"  # test hook: "<rank>@<step>" stops that rank there
_GRACE_S = 10.0  # how long a timed-out rank waits for the other waiting ranks to time out too


class StalledRankError(RunFailure):
    """A collective timed out; the message names the rank(s) that fell behind."""


def _store(env: DistEnv) -> Any:
    if not env.initialized:
        return None
    return dist.distributed_c10d._get_default_store()


def report_position(env: DistEnv, step: int, phase: str) -> None:
    """Record that this rank reached `step` in `phase` (a no-op with one process)."""
    store = _store(env)
    if store is None:
        return
    where = f"{step}|{phase}|{time.time():.3f}|{socket.gethostname()}|{os.getpid()}"
    store.set(_KEY.format(rank=env.rank), where)
    if os.environ.get(STOP_ENV) == f"{env.rank}@{step}":
        os.kill(os.getpid(), signal.SIGSTOP)


def is_collective_timeout(err: BaseException) -> bool:
    """True for the error a collective raises when a peer did not answer in time (gloo:
    "Timed out waiting ...ms for recv"; NCCL with blocking wait: "Watchdog caught collective
    operation timeout"; torch's `DistTimeoutError`)."""
    timeout_type = getattr(dist, "DistTimeoutError", None)
    if timeout_type is not None and isinstance(err, timeout_type):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "Timed out waiting" in text or "collective operation timeout" in text
    )


def stall_report(env: DistEnv, timeout_s: float | None) -> str:
    """One line naming the ranks that fell behind, from the positions in the store."""
    bound = f"every collective waits at most cluster.collective_timeout_s={timeout_s:g} s"
    store = _store(env)
    if store is None:
        return f"a collective timed out; {bound}"
    store.set_timeout(timedelta(seconds=_READ_TIMEOUT_S))
    try:
        # Every rank waiting in the collective times out too and says so here; a rank that
        # never does, within the grace period, is not waiting: it is the stalled one.
        store.set(_TIMED_OUT.format(rank=env.rank), "1")
        timed_out = _wait_for_peers(store, env.world_size, min(_GRACE_S, timeout_s or _GRACE_S))
        positions = {rank: store.get(_KEY.format(rank=rank)).decode().split("|")
                     for rank in range(env.world_size) if store.check([_KEY.format(rank=rank)])}  # fmt: skip
    except Exception:  # the store's host (rank 0) does not answer
        return (
            f"a collective timed out and rank 0's store did not answer within "
            f"{_READ_TIMEOUT_S:g} s: rank 0 (which hosts it) is likely the stalled one; {bound}"
        )
    missing = [rank for rank in range(env.world_size) if rank not in positions]
    now = time.time()
    furthest = max((int(p[0]) for p in positions.values()), default=0)
    behind = [r for r, p in sorted(positions.items()) if int(p[0]) < furthest or r not in timed_out]
    ahead = [r for r in sorted(positions) if r not in behind]
    names = []
    for rank in behind:
        step, phase, seen, host, pid = positions[rank]
        ago = now - float(seen)
        names.append(f"rank {rank} (host {host}, pid {pid}) last seen at step {step} ({phase}), "
                     f"{ago:.0f} s ago")  # fmt: skip
    names += [f"rank {rank} never reported" for rank in missing]
    if not names:
        return f"a collective timed out on every rank; {bound}"
    waiting = ", ".join(map(str, ahead))
    others = f", while rank(s) {waiting} waited at step {furthest}" if ahead else ""
    return f"stalled: {'; '.join(names)}{others}; {bound}"


def _wait_for_peers(store: Any, world_size: int, grace_s: float) -> set[int]:
    """The ranks that reported a timed-out collective, waiting up to `grace_s` for all."""
    keys = {rank: _TIMED_OUT.format(rank=rank) for rank in range(world_size)}
    deadline = time.monotonic() + grace_s
    while True:
        done = {rank for rank, key in keys.items() if store.check([key])}
        if len(done) == world_size or time.monotonic() >= deadline:
            return done
        time.sleep(0.2)
