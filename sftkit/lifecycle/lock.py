"""One run per checkpoint directory: `<checkpoint_dir>/.sftkit.lock`, held for the run's life.

Two runs into one directory overwrite each other's checkpoints and final_hf, and one run's
stale-save cleanup deletes the other's save in progress. Rank 0 creates the lock file
(O_EXCL) holding host, pid, Slurm job id, start time and a heartbeat it refreshes every
`HEARTBEAT_S` from a daemon thread; a second run is refused at start. A lock is taken over
(with a warning) only on evidence that its holder is dead: its heartbeat is older than
`STALE_AFTER_S`, its process is gone from this host, or it belongs to an earlier incarnation
of this Slurm job (another `SLURM_RESTART_COUNT`: Slurm ended every step before the
requeue). The same job id alone is no evidence: a second run inside one allocation took
over a live run's lock and the two overwrote each other's checkpoints.
`checkpointing.take_over_lock=true` takes any lock over.

A run whose lock was taken over anyway (it was paused past `STALE_AFTER_S`: SIGSTOP, a
hung filesystem) must not write again: `ensure_held` before every save ends it (exit 1).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sftkit.data.cache import pid_alive
from sftkit.dist import DistEnv
from sftkit.errors import RunFailure

logger = logging.getLogger("sftkit")

LOCK_NAME = ".sftkit.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the holder is gone (or its node is)


class LockHeldError(ValueError):
    """Another live run holds the checkpoint directory."""


class LockLostError(RunFailure):
    """Another run took this run's lock over: this run stops without writing (exit 1)."""


@dataclass
class Holder:
    """What the lock file says about the run that holds it."""

    host: str
    pid: int
    slurm_job_id: str | None
    started: float
    heartbeat: float
    token: str  # tells this process's lock from a stale one with the same host and pid
    slurm_restart: str | None = None  # SLURM_RESTART_COUNT: which incarnation of the job

    @staticmethod
    def me() -> Holder:
        now = time.time()
        return Holder(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), now,
                      now, f"{os.getpid()}-{time.monotonic_ns()}",
                      os.environ.get("SLURM_RESTART_COUNT", "0"))  # fmt: skip

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host}{job}, started {started}, heartbeat {age:.0f}s ago"


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in `path`; None when the file is gone or unreadable (stale)."""
    try:
        data: Any = json.loads(path.read_text())
        return Holder(
            host=str(data["host"]), pid=int(data["pid"]),
            slurm_job_id=None if data.get("slurm_job_id") is None else str(data["slurm_job_id"]),
            started=float(data["started"]), heartbeat=float(data["heartbeat"]),
            token=str(data.get("token", "")),
            slurm_restart=None if data.get("slurm_restart") is None else str(data["slurm_restart"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(holder: Holder | None, me: Holder) -> str | None:
    """Why `holder`'s lock may be taken over, or None when it belongs to a live run."""
    if holder is None:
        return "unreadable lock file"
    if time.time() - holder.heartbeat > STALE_AFTER_S:
        return f"no heartbeat for {time.time() - holder.heartbeat:.0f}s"
    same_job = holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id
    if same_job and holder.slurm_restart != me.slurm_restart:
        return (f"left by this Slurm job ({holder.slurm_job_id}) before requeue "
                f"{me.slurm_restart}")  # fmt: skip
    if holder.host == me.host:
        if holder.pid == me.pid:
            return "left by this process"
        if not pid_alive(holder.pid):
            return f"process {holder.pid} is gone"
    return None


def take_run_lock(directory: Path, take_over: bool, env: DistEnv) -> RunLock | None:
    """Rank 0 takes the lock on `directory` (the others get None); every rank raises
    LockHeldError together when it is held, so none goes on to wait in a collective."""
    lock = RunLock(directory, take_over) if env.is_main else None
    error: LockHeldError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except LockHeldError as err:
            error = err
    if env.max(1.0 if error else 0.0) > 0:
        if lock is not None and error is None:
            lock.release()
        raise error or LockHeldError(f"rank 0 could not take the lock on {directory}")
    return lock


def ensure_held(lock: RunLock | None, env: DistEnv) -> None:
    """Before a save, on every rank: raise LockLostError when rank 0's lock now names another
    run, so this run neither overwrites that run's checkpoints nor prunes them."""
    lost = lock is not None and not lock.held()
    if env.max(1.0 if lost else 0.0) > 0:
        where = lock.path.parent if lock is not None else "checkpointing.checkpoint_dir"
        holder = read_holder(lock.path) if lock is not None else None
        by = f" by {holder.describe()}" if holder is not None else ""
        raise LockLostError(
            f"another run took over {where}{by} while this one was paused: stopping without "
            "saving, so the two runs do not overwrite each other's checkpoints"
        )


class RunLock:
    """The lock on one checkpoint directory; `acquire`, then `release` when the run ends."""

    def __init__(self, directory: Path, take_over: bool = False) -> None:
        self.path = directory / LOCK_NAME
        self.take_over = take_over
        self.me = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockHeldError naming the holder and the switch."""
        for _ in range(10):  # a race with another starter: look again
            if self._create():
                self._start_heartbeat()
                return
            holder = read_holder(self.path)
            reason = stale_reason(holder, self.me)
            if reason is None and not self.take_over:
                assert holder is not None
                raise LockHeldError(
                    f"{self.path.parent} is in use by another run ({holder.describe()}): two "
                    "runs in one checkpoint_dir overwrite each other. Wait for it, use another "
                    "checkpointing.checkpoint_dir, or set checkpointing.take_over_lock=true if "
                    "that run is dead"
                )
            why = reason or "checkpointing.take_over_lock=true"
            logger.warning("Taking over the lock %s (%s)", self.path, why)
            self._remove_if_unchanged(holder)
            time.sleep(0.05)
        raise LockHeldError(f"could not take the lock {self.path}: other runs keep taking it")

    def held(self) -> bool:
        """Whether the lock file still names this run (False once another run took over)."""
        holder = read_holder(self.path)
        return holder is not None and holder.token == self.me.token

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Publish a complete lock file atomically: written aside, then hard-linked into
        place (link fails when the name exists, and never shows a half-written file)."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.me.token}.tmp")
        tmp.write_text(json.dumps(asdict(self.me)))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _remove_if_unchanged(self, seen: Holder | None) -> None:
        """Delete the stale lock, unless another starter replaced it since it was read."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_holder(aside)
        if seen is not None and (moved is None or moved.token != seen.token):
            try:  # a fresh lock taken meanwhile: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="sftkit-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.held():
                logger.error(
                    "The lock %s was taken over by another run; this run stops at its next "
                    "save without writing", self.path,
                )  # fmt: skip
                return
            self.me.heartbeat = time.time()
            tmp = self.path.with_name(f"{LOCK_NAME}.{self.me.token}.tmp")
            try:
                tmp.write_text(json.dumps(asdict(self.me)))
                os.replace(tmp, self.path)
            except OSError as err:  # a full disk must not kill the run; the lock ages instead
                logger.warning("Could not refresh the lock %s: %s", self.path, err)
