"""Progress of one long pass (hashing the input, tokenizing, writing the cache, loading
weights or a checkpoint, exporting): a tqdm bar on a terminal, a log line every ~10%
otherwise, both only where `enabled` (rank 0 by default).

    with Progress("hashing data", total=size, unit="B", enabled=rank == 0) as progress:
        for chunk in chunks:
            progress.update(len(chunk))

    hashing data: 40% (1.2 GB/3.0 GB) | 410.3 MB/s | eta 4s

A pass that ends before its first 10% logs nothing but a closing line when it took more
than `quiet_s` (a cached run's start-up stays quiet). Where the total is unknown (None) the
log lines come every `every_s` seconds with the count and rate.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

from sftkit.log.console import LOGGER_NAME, format_eta

_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def format_amount(value: float, unit: str) -> str:
    """`1.2 GB` for bytes (powers of 1000, as `du --si` and tqdm's unit_scale), `12,345 rows`
    for counts."""
    if unit != "B":
        return f"{value:,.0f} {unit}"
    for name in _BYTE_UNITS:
        if abs(value) < 1000 or name == _BYTE_UNITS[-1]:
            return f"{value:.0f} {name}" if name == "B" else f"{value:.1f} {name}"
        value /= 1000
    raise AssertionError("unreachable")


class Progress:
    """Counts work done against `total`; see the module docstring for what is shown."""

    def __init__(
        self,
        desc: str,
        total: float | None,
        unit: str = "rows",
        *,
        enabled: bool = True,
        logger: logging.Logger | None = None,
        step_fraction: float = 0.1,
        every_s: float = 30.0,
        quiet_s: float = 2.0,
        bar: bool | None = None,
    ) -> None:
        self.desc = desc
        self.total = total if total is None or total > 0 else None
        self.unit = unit
        self.enabled = enabled
        self.n = 0.0
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._step = step_fraction
        self._every_s = every_s
        self._quiet_s = quiet_s
        self._t0 = time.monotonic()
        self._steps_logged = 1  # the next line is due at `_steps_logged * step_fraction`
        self._next_time = self._t0 + every_s
        self._logged = False
        self._bar: Any = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                unit_scale=unit == "B",
                dynamic_ncols=True,
                leave=False,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(done=exc_type is None)

    def update(self, amount: float = 1) -> None:
        """Add `amount` of work done; logs a line when the next ~10% (or `every_s`) is reached."""
        self.n += amount
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(amount)
            return
        now = time.monotonic()
        if self.total is not None:
            fraction = self.n / self.total
            # Compared in whole steps (1e-9 slack): 3 * 0.1 is 0.30000000000000004.
            if fraction + 1e-9 >= self._steps_logged * self._step and fraction < 1:
                self._log(self.line(now))
                while self._steps_logged * self._step <= fraction + 1e-9:
                    self._steps_logged += 1
        elif now >= self._next_time:
            self._log(self.line(now))
            self._next_time = now + self._every_s

    def line(self, now: float | None = None) -> str:
        """The log line for the work done so far."""
        elapsed = max((now or time.monotonic()) - self._t0, 1e-9)
        rate = self.n / elapsed
        done = format_amount(self.n, self.unit)
        rate_text = f"{format_amount(rate, self.unit)}/s"
        if self.total is None:
            return f"{self.desc}: {done} | {rate_text} | {elapsed:.0f}s"
        percent = 100 * min(self.n / self.total, 1.0)
        eta = (self.total - self.n) / rate if rate > 0 else None
        return (
            f"{self.desc}: {percent:.0f}% ({done}/{format_amount(self.total, self.unit)})"
            f" | {rate_text} | eta {format_eta(eta) if eta is not None else '?'}"
        )

    def _log(self, line: str) -> None:
        self._logged = True
        self._logger.info(line)

    def close(self, done: bool = True) -> None:
        """End the pass: close the bar, and log a closing line where progress was logged or
        the pass took longer than `quiet_s`."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elapsed = time.monotonic() - self._t0
        if done and (self._logged or elapsed > self._quiet_s):
            total = format_amount(self.n, self.unit)
            self._logger.info(f"{self.desc}: done, {total} in {elapsed:.1f}s")
