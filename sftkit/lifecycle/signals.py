"""What stops a run early: a signal (`StopFlag`), the checkpoint deadline (`Deadline`), and
the preemption marker that tells a job script the run saved and wants requeueing (75).

A run stops early by finishing its step, saving and returning `EXIT_REQUEUE`; a signal
during setup (nothing to save yet) ends it at once (`Preempted`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("sftkit")

MARKER_ENV = "SFTKIT_PREEMPTED_MARKER"  # where rank 0 leaves the marker (launcher scripts)
MARKER_NAME = ".preempted"  # default: <checkpoint_dir>/.preempted


class Preempted(BaseException):
    """A stop signal during setup: nothing to save yet, so the run ends at once (exit 75).
    A BaseException, like KeyboardInterrupt, so no `except Exception` in setup swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def preempted_marker(checkpoint_dir: Path) -> Path:
    """The file rank 0 writes when the run stops for requeue (exit 75).

    torchrun returns 1 whatever its ranks returned, so job scripts test for this file
    instead (`examples/slurm/sft.sbatch`); `$SFTKIT_PREEMPTED_MARKER` overrides the path.
    """
    return Path(os.environ.get(MARKER_ENV) or checkpoint_dir / MARKER_NAME)


def write_preempted_marker(path: Path, step: int, reason: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}) + "\n")
    except OSError as err:  # the exit code still says 75 where the launcher passes it on
        logger.warning("Could not write the preemption marker %s: %s", path, err)


@dataclass
class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop finishes its step, saves and exits for requeue.

    While `interrupt` is set (setup: tokenizing, loading the model) the handler raises
    Preempted instead, so a signal then ends the run at once rather than after setup.
    """

    signum: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)
    interrupt: bool = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.interrupt:
            raise Preempted(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def reason(self) -> str:
        return f"signal {signal.Signals(self.signum).name}" if self.signum else ""


@dataclass
class Deadline:
    """`checkpointing.checkpoint_must_save_by`: stop while there is still time to save.

    A step is allowed only if twice the last step's time plus the last save's time still
    fits before the deadline (one slow step must not push the save past a job's wall time).
    """

    seconds: float | None  # from the start of the loop; None: no deadline
    started: float = field(default_factory=time.monotonic)
    last_save: float = 0.0  # seconds the last save took

    def near(self, step_started: float) -> bool:
        if self.seconds is None:
            return False
        now = time.monotonic()
        return (now - self.started) + 2 * (now - step_started) + self.last_save >= self.seconds
