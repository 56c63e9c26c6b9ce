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


_OWN_PROCESS = [False]  # set by the command-line entry points (`own_process`)


def own_process() -> None:
    """Called by the command-line entry points: this process ends when the run does, so after
    a stop for requeue the stop signals stay ignored until it exits (a repeated SIGTERM
    meeting the default handler while exiting turned the logged 75 into 143)."""
    _OWN_PROCESS[0] = True


REPEAT_WINDOW_S = 2.0  # a second Ctrl-C within this is the same one delivered twice


@dataclass
class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; the loop finishes its step, saves and exits for
    requeue (75 and the marker).

    While `interrupt` is set (setup: tokenizing, loading the model) the first signal raises
    Preempted instead, so it ends the run at once rather than after setup. Repeated signals
    are idempotent: `timeout` and a process-group kill deliver SIGTERM twice, and under
    torchrun or self-launch every rank gets the terminal's SIGINT and the launcher's SIGTERM,
    so only the first one acts (a second Preempted raised inside the first one's handling
    ended in a traceback, exit 1 and no marker). A second Ctrl-C more than `REPEAT_WINDOW_S`
    after the first is the user insisting: it aborts at once (KeyboardInterrupt).
    """

    signum: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)
    interrupt: bool = False
    raised: bool = False  # Preempted was raised once: later signals only record
    first_at: float | None = None  # monotonic time of the first signal

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def _handle(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.signum, self.first_at = signum, now
            if signum == signal.SIGINT:
                logger.warning(
                    "Ctrl-C: stopping after this step and saving (exit code 75); press "
                    "Ctrl-C again after %.0f s to abort without saving", REPEAT_WINDOW_S,
                )  # fmt: skip
        elif signum == signal.SIGINT and now - self.first_at > REPEAT_WINDOW_S:
            logger.warning("Second Ctrl-C: aborting without saving")
            raise KeyboardInterrupt
        if self.interrupt and not self.raised:
            self.raised = True
            raise Preempted(signum)

    def restore(self, stopped: bool = False) -> None:
        """Put the previous handlers back; `stopped` (exiting 75) in a process the run owns:
        ignore further stop signals instead, until the process exits."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped and _OWN_PROCESS[0] else handler)
        self.previous.clear()

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
