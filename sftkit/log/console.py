"""What a person watching the terminal sees: one line per step on rank 0, and a progress bar.

    step 12/100 | loss 1.2345 | lr 1.0e-04 | grad_norm 0.52 | tok/s 12,345 | eta 1m05s
    validation step 10 | val_loss 1.2301 | time 3.2s

Lines go to the "sftkit" logger (stderr, via `setup_logging`), so stdout stays free for
machine-readable output. Fields appear when their metric is logged; which ones are logged
depends only on the config, so every line of a run has the same fields.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from sftkit.log.redact import install_redaction

LOGGER_NAME = "sftkit"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is now (a redirect or a test's capture set after
    setup), never to a stream that has since been closed."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(rank: int = 0, level: int | str = logging.INFO) -> logging.Logger:
    """Send the "sftkit" logger to stderr (INFO on rank 0, WARNING on others), secrets scrubbed.

    Idempotent: a second call changes the level only.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_sftkit", False) for h in logger.handlers):
        handler = _StderrHandler()
        prefix = "" if rank == 0 else f"[rank {rank}] "
        handler.setFormatter(logging.Formatter(prefix + _FORMAT, datefmt="%H:%M:%S"))
        handler._sftkit = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    install_redaction()
    quiet_dependency_output()
    return logger


class _TorchaoEnumNotice(logging.Filter):
    """Drops torch's notice that torchao registers its Enums as pytree constants: two lines
    in every process, because transformers imports torchao (its quantizer) when installed.
    Nothing to act on for a user; can go when torchao stops calling register_constant on
    Enums. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("%s is an Enum subclass and is now natively"):
            return True
        owner = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not str(getattr(owner, "__module__", "")).startswith("torchao.")


def quiet_dependency_output() -> None:
    """No progress bars from the Hugging Face libraries when stderr is not a terminal (a log
    file would get one line per update), and no torchao Enum notice (`_TorchaoEnumNotice`)."""
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _TorchaoEnumNotice) for f in pytree.filters):
        pytree.addFilter(_TorchaoEnumNotice())
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers reads this when imported
    if "transformers" in sys.modules:  # imported already: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def format_eta(seconds: float) -> str:
    """`65` -> `1m05s`, `7260` -> `2h01m`, `9` -> `9s`."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _tokens_per_sec(metrics: Mapping[str, Any]) -> float | None:
    """Trained tokens per second over all ranks."""
    tokens = metrics.get("train/global_valid_toks")
    seconds = metrics.get("timing/train/total_step_time")
    if tokens is not None and seconds:
        return float(tokens) / float(seconds)
    return None


def format_step_line(
    step: int, total_steps: int, metrics: Mapping[str, Any], eta_s: float | None
) -> str:
    """The fixed-field console line of one training step."""
    fields = [f"step {step}/{total_steps}"]
    if (loss := metrics.get("train/loss")) is not None:
        fields.append(f"loss {float(loss):.4f}")
    if (lr := metrics.get("train/lr")) is not None:
        fields.append(f"lr {float(lr):.1e}")
    if (grad_norm := metrics.get("train/grad_norm")) is not None:
        fields.append(f"grad_norm {float(grad_norm):.3g}")
    if (tps := _tokens_per_sec(metrics)) is not None:
        fields.append(f"tok/s {tps:,.0f}")
    if (mfu := metrics.get("train/mfu")) is not None:
        pct = 100 * float(mfu)  # a tiny model's 0.0042% is not shown as 0.0%
        fields.append(f"mfu {pct:.1f}%" if pct >= 0.1 or pct == 0 else f"mfu {pct:.2g}%")
    if eta_s is not None:
        fields.append(f"eta {format_eta(eta_s)}")
    return " | ".join(fields)


def format_validation_line(step: int, metrics: Mapping[str, Any]) -> str:
    """The console line of one validation."""
    fields = [f"validation step {step}"]
    if (loss := metrics.get("validation/val_loss")) is not None:
        fields.append(f"val_loss {float(loss):.4f}")
    if (seconds := metrics.get("timing/validation/total_validation_time")) is not None:
        fields.append(f"time {float(seconds):.1f}s")
    return " | ".join(fields)


class ConsoleReporter:
    """Rank 0's step and validation lines, plus a tqdm bar when stderr is a terminal.

    `start_step` is the step a resumed run starts after; the ETA uses the wall time per
    step measured since this reporter was made (validation time included).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        rank: int = 0,
        progress_bar: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = rank == 0
        self._logger = logger or logging.getLogger(LOGGER_NAME)
        self._t0 = time.monotonic()
        self._bar: Any = None
        self._redirect = contextlib.ExitStack()
        if self.enabled and progress_bar and sys.stderr.isatty():
            self._start_bar()

    def _start_bar(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines are written above the bar instead of through it (filters are kept).
        self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger(), self._logger]))
        self._bar = tqdm(
            total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True
        )

    def eta(self, step: int) -> float | None:
        """Seconds left at `step`, from the mean wall time per step so far."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.monotonic() - self._t0) / done * max(self.total_steps - step, 0)

    def step(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Log the line for `step` (rank 0 only) and advance the bar; returns the line."""
        if not self.enabled:
            return None
        line = format_step_line(step, self.total_steps, metrics, self.eta(step))
        self._logger.info(line)
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
        return line

    def validation(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Log the validation line (rank 0 only); returns it."""
        if not self.enabled:
            return None
        line = format_validation_line(step, metrics)
        self._logger.info(line)
        return line

    def close(self) -> None:
        """Close the bar and restore the logging handlers."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()
