"""Bounds on rendering untrusted chat templates: a time budget and the Jinja floor.

- Time: a template with nested loops rendered for 150 s with no output until it was killed.
  Each row (all of its renders) and the template's probe conversations get
  `RENDER_BUDGET_S` seconds, enforced with SIGALRM (the template runs as Python bytecode,
  so the signal interrupts any loop). Off the main thread there is no budget (signals reach
  only the main thread); another armed timer (pytest-timeout's, a caller's alarm) is
  re-armed with its remaining time afterwards, or left to fire when it comes first.
- Jinja: releases below `JINJA2_FLOOR` let a template out of the sandbox (3.1.5:
  `|attr('format')` reaches `os.environ`, CVE-2025-27516). pyproject.toml requires the
  floor, but an environment can hold an older one anyway (`uv run --with jinja2==3.1.5`),
  so rendering refuses to start there.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import jinja2
from packaging.version import Version

RENDER_BUDGET_S = 10.0  # real templates render a 1M-character row in well under 1 s
JINJA2_FLOOR = (3, 1, 6)


class _OutOfTime(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` inside Jinja eats it."""


@contextmanager
def time_budget(seconds: float, error: Callable[[], Exception]) -> Iterator[None]:
    """Run the block for at most `seconds`, then raise `error()` (see the module docstring)."""
    outer, interval = signal.getitimer(signal.ITIMER_REAL)
    if threading.current_thread() is not threading.main_thread() or 0 < outer <= seconds:
        yield  # off the main thread no signal arrives; an earlier outer alarm bounds it anyway
        return

    def fire(signum: int, frame: FrameType | None) -> None:
        raise _OutOfTime

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _OutOfTime:
        raise error() from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer > 0:  # re-arm the other timer (pytest-timeout, a caller's alarm) with its rest
            rest = max(outer - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, rest, interval)


def check_jinja_version(installed: str | None = None) -> None:
    """Refuse to render with a jinja2 below the floor, in one line saying how to fix it."""
    installed = installed or jinja2.__version__
    floor = ".".join(map(str, JINJA2_FLOOR))
    # packaging's ordering: a digit-only parse read "3.1.7rc1" as 3.1.0 and refused it.
    if Version(installed) < Version(floor):
        raise ImportError(
            f"jinja2 {installed} is installed, and chat templates can escape its sandbox (3.1.5 "
            f"and older read environment variables through |attr('format')); sftkit renders "
            f"templates only with jinja2 >= {floor}: install it (pip install 'jinja2>={floor}')."
        )
