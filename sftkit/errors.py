"""The one error path of every command (`sftkit sft|preview|eval|export`, `examples/*.py`).

A known error becomes one message on stderr, scrubbed of secrets, and an exit code:

* 2: the fix is in the user's hands: a config key (`ConfigError`), bad data (`DataError`),
  a bad setting, path or checkpoint (`ValueError`, a missing or unreadable file), a missing
  optional dependency (`ImportError`);
* 1: the run failed on valid input: non-finite loss (`RunFailure`), an unreachable tracker
  (`ConnectionError`), a disk or I/O error while writing (other `OSError`s).

(0 is a finished run; 75 "saved early, start again" is a return value of the run, not an
error: `sftkit.lifecycle.signals`; 130 is a second Ctrl-C, an abort without saving.) These
`EXIT_*` codes are the only ones. Anything else
is a bug: it propagates with its traceback, also scrubbed (`install_excepthook`).
`SFTKIT_TRACEBACK=1` prints the traceback of known errors too.

Imports nothing heavy: the config and data packages raise these without loading torch.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

EXIT_OK = 0  # finished: every step done, final_hf written
EXIT_FAILED = 1  # the run failed on valid input (non-finite loss, a crash, I/O)
EXIT_USAGE = 2  # a config or usage error, reported before training starts
EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved and stopped early (signal or deadline); start again
EXIT_ABORTED = 130  # a second Ctrl-C: stopped at once, nothing saved (128 + SIGINT)

# OSErrors whose fix is a different path or permission: a usage error, like a bad key.
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


class RunFailure(RuntimeError):
    """A run that stopped on valid input (non-finite loss, ...): exit code 1, one line."""


class NonFiniteError(RunFailure):
    """A NaN or Inf loss, gradient or weight; raised before the optimizer or a save used it."""


def classify(err: BaseException) -> tuple[int, str] | None:
    """(exit code, label) of a known error, or None for a bug (to re-raise)."""
    from sftkit.config.errors import ConfigError

    if isinstance(err, ConfigError):
        return EXIT_USAGE, "Config error"
    if isinstance(err, RunFailure):
        return EXIT_FAILED, "Training stopped"
    if isinstance(err, (ConnectionError, TimeoutError)):  # before OSError: they are OSErrors
        return EXIT_FAILED, "Error"
    if isinstance(err, OSError):
        return (EXIT_USAGE if err.errno in _PATH_ERRNOS else EXIT_FAILED), "Error"
    if isinstance(err, (ValueError, ImportError)):  # DataError, ResumeMismatchError included
        return EXIT_USAGE, "Error"
    return None


def add_usage_hint(err: BaseException, hint: str) -> None:
    """Append `hint` to `err`'s message if it is reported as a usage error (exit 2)."""
    err.sftkit_hint = hint  # type: ignore[attr-defined]


def report_error(err: BaseException, stream: TextIO | None = None) -> int | None:
    """Print a known error as `<label>: <message>` (scrubbed) and return its exit code;
    None (nothing printed) when `err` is not a known error."""
    from sftkit.log.redact import scrub

    known = classify(err)
    if known is None:
        return None
    code, label = known
    stream = sys.stderr if stream is None else stream
    if os.environ.get("SFTKIT_TRACEBACK"):
        stream.write(scrub("".join(traceback.format_exception(type(err), err, err.__traceback__))))
    message = str(err).strip() or type(err).__name__
    if code == EXIT_USAGE:
        message += getattr(err, "sftkit_hint", "")
    print(f"{label}: {scrub(message)}", file=stream)
    return code


def run_reporting_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, with a known error turned into its message and exit code."""
    try:
        return fn(*args)
    except KeyboardInterrupt:  # the second Ctrl-C (`StopFlag`): one line, not a traceback
        print("Aborted (Ctrl-C): nothing saved", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as err:
        code = report_error(err)
        if code is None:
            raise
        return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose usage errors (which echo the bad value) are scrubbed like the rest."""

    def error(self, message: str) -> NoReturn:
        from sftkit.log.redact import scrub

        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {scrub(message)}\n")


def install_excepthook() -> None:
    """Scrub the traceback of an unexpected error (a bug) before Python prints it."""
    if getattr(sys.excepthook, "_sftkit", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        from sftkit.log.redact import scrub

        if issubclass(kind, KeyboardInterrupt):
            previous(kind, value, tb)
            return
        sys.stderr.write(scrub("".join(traceback.format_exception(kind, value, tb))))

    hook._sftkit = True  # type: ignore[attr-defined]
    sys.excepthook = hook
