"""Preparing the data once: one process prepares, the ranks it serves wait and map its entry.

`data.cache_scope` picks who prepares on a cache miss: `node` (the default: `cache_dir` on
each node's own disk) -> local rank 0 of each host; `shared` (a `cache_dir` every node
sees) -> rank 0 alone. Before this, every rank hashed (read) the whole input and queued on
the cache's node lock: 8 ranks of a node read a multi-GB dataset 8 times, and a preparer
that failed was followed by the next rank preparing again.

The preparer sends the cache key, or its error, through the process group's key-value
store (no collective: a rank that never arrives cannot hang the others). The others poll
for it every `POLL_S` seconds (so a signal still stops them), log while they wait, and give
up after `data.prepare_timeout_s`. A preparer's error ends each of them with its message and
its exit code. Independent runs sharing a cache stay safe as before: the preparer takes the
cache's node lock and publishes atomically (`sftkit.data.cache`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sftkit.errors import EXIT_USAGE, RunFailure, classify

if TYPE_CHECKING:
    from sftkit.dist import DistEnv

logger = logging.getLogger("sftkit")

POLL_S = 0.5  # a waiting rank checks the store this often; signals are handled in between
LOG_EVERY_S = 60.0  # a waiting rank's progress line
READ_WAIT_S = 30.0  # a failed preparer waits this long at most for the others to read why
SCOPES = ("node", "shared")
# Calls on every rank come in the same order, so the n-th call's key is the same everywhere
# and a second `prepare_data` in one process group never reads the first one's answer.
_calls = itertools.count()


class PrepareFailed(ValueError):
    """The preparing process stopped on the user's input (exit 2 on every rank)."""


@dataclass
class PrepareGroup:
    """This rank's part in preparing the data: prepare and tell, or wait and be told."""

    store: Any  # torch.distributed.Store
    key: str
    preparer: bool
    who: str  # the preparing process, as messages name it
    timeout_s: float
    waiters: int = 0  # how many ranks wait for this preparer

    @classmethod
    def of(cls, env: DistEnv | None, scope: str, timeout_s: float) -> PrepareGroup | None:
        """None where this process is alone (no process group): it prepares by itself."""
        if env is None or not env.initialized:
            return None
        if scope not in SCOPES:
            raise ValueError(f"data.cache_scope={scope!r}: use node or shared.")
        from torch.distributed.distributed_c10d import _get_default_store

        call = next(_calls)
        if scope == "shared":
            key, preparer, who = f"sftkit/data/{call}/all", env.rank == 0, "rank 0"
            waiters = env.world_size - 1
        else:  # the host, as the cache's node lock and verified marker name a node
            host = socket.gethostname()
            key, preparer = f"sftkit/data/{call}/{host}", env.local_rank == 0
            who = f"local rank 0 on {host}"
            waiters = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) - 1
        return cls(_get_default_store(), key, preparer, who, timeout_s, waiters)

    def done(self, entry: str) -> None:
        """Tell the waiting ranks which cache entry holds the data."""
        self.store.set(self.key, json.dumps({"entry": entry}))

    def failed(self, err: BaseException) -> None:
        """Tell the waiting ranks why there is no entry (they stop with this message)."""
        known = classify(err)
        message = str(err).strip() or type(err).__name__
        self.store.set(self.key, json.dumps({"error": message, "code": known and known[0]}))
        # Where the store lives in this process (rank 0 without torchrun's agent), leaving
        # at once closed it before the others read the message: they failed with
        # "DistNetworkError: Failed to recv". Wait (briefly) until each has read it.
        deadline = time.monotonic() + READ_WAIT_S
        while self.store.add(f"{self.key}/read", 0) < self.waiters and time.monotonic() < deadline:
            time.sleep(POLL_S / 5)

    def wait(self) -> str:
        """The entry's key, once the preparer has it; raises the preparer's error, or after
        `timeout_s` a TimeoutError naming `data.prepare_timeout_s`."""
        start = time.monotonic()
        last_log = start
        logger.info("waiting for %s to prepare the data (at most %.0fs)", self.who, self.timeout_s)
        while not self.store.check([self.key]):
            now = time.monotonic()
            if now - start >= self.timeout_s:
                raise TimeoutError(
                    f"{self.who} did not finish preparing the data within "
                    f"data.prepare_timeout_s={self.timeout_s:g} seconds; raise it for a dataset "
                    "that takes longer, or prepare the data first (`sftkit preview`, one process)"
                )
            if now - last_log >= LOG_EVERY_S:
                logger.info(
                    "still waiting for %s to prepare the data: %.0fs", self.who, now - start
                )
                last_log = now
            time.sleep(POLL_S)
        answer = json.loads(self.store.get(self.key))
        self.store.add(f"{self.key}/read", 1)
        if "entry" in answer:
            return str(answer["entry"])
        message = f"{answer['error']} (reported by {self.who}, which prepared the data)"
        if answer["code"] == EXIT_USAGE:
            raise PrepareFailed(message)
        if answer["code"] is not None:
            raise RunFailure(message)
        raise RuntimeError(message)
