"""The rank-0 console line, the validation line, the ETA and the progress bar."""

from __future__ import annotations

import io
import logging
import sys

import pytest

import sftkit.log.console as console_mod
from sftkit.log import ConsoleReporter, format_eta, format_step_line, format_validation_line

METRICS = {
    "train/loss": 1.23451,
    "train/lr": 1e-4,
    "train/grad_norm": 0.5213,
    "train/global_valid_toks": 24690,
    "timing/train/total_step_time": 2.0,
}


def test_step_line_format() -> None:
    line = format_step_line(12, 100, METRICS, eta_s=65)
    assert (
        line
        == "step 12/100 | loss 1.2345 | lr 1.0e-04 | grad_norm 0.521 | tok/s 12,345 | eta 1m05s"
    )


def test_step_line_with_mfu_and_missing_fields() -> None:
    line = format_step_line(1, 5, {"train/loss": 2.0, "train/mfu": 0.408}, eta_s=None)
    assert line == "step 1/5 | loss 2.0000 | mfu 40.8%"
    tiny = format_step_line(1, 5, {"train/mfu": 4.2e-5}, eta_s=None)
    assert tiny == "step 1/5 | mfu 0.0042%"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (9.4, "9s"), (65, "1m05s"), (3599, "59m59s"), (7260, "2h01m")]
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


def test_validation_line() -> None:
    metrics = {"validation/val_loss": 0.98765, "timing/validation/total_validation_time": 3.21}
    assert format_validation_line(10, metrics) == "validation step 10 | val_loss 0.9877 | time 3.2s"


def test_reporter_logs_one_line_per_step_with_eta(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([100.0, 110.0, 120.0])  # construction, then one call per step
    monkeypatch.setattr(console_mod.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="sftkit")
    reporter = ConsoleReporter(total_steps=10, start_step=4, progress_bar=False)
    first = reporter.step(5, METRICS)
    second = reporter.step(6, METRICS)
    reporter.validation(6, {"validation/val_loss": 1.0})
    reporter.close()
    assert first is not None and first.endswith("eta 50s")  # 10 s/step, 5 steps left
    assert second is not None and second.endswith("eta 40s")  # 20 s / 2 steps, 4 left
    lines = [r.getMessage() for r in caplog.records if r.name == "sftkit"]
    assert lines == [first, second, "validation step 6 | val_loss 1.0000"]


def test_reporter_is_silent_off_rank0(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    reporter = ConsoleReporter(total_steps=3, rank=2)
    assert reporter.step(1, METRICS) is None
    assert reporter.validation(1, {"validation/val_loss": 1.0}) is None
    reporter.close()
    assert caplog.records == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    reporter = ConsoleReporter(total_steps=10, start_step=2, progress_bar=True)
    assert reporter._bar is not None
    reporter.step(3, METRICS)
    reporter.close()
    assert "3/10" in fake.getvalue()

    off = ConsoleReporter(total_steps=10, progress_bar=False)
    assert off._bar is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert ConsoleReporter(total_steps=10, progress_bar=True)._bar is None


def test_torchao_enum_notice_is_dropped_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """torch logs one line per torchao Enum that torchao registers (transformers imports
    torchao when installed); the filter drops exactly those."""
    import enum

    class KernelPreference(enum.Enum):
        AUTO = "auto"

    class Mine(enum.Enum):
        A = 1

    KernelPreference.__module__ = "torchao.quantization.quantize_.common.kernel_preference"
    console_mod.quiet_dependency_output()
    pytree = logging.getLogger("torch.utils._pytree")
    notice = (
        "%s is an Enum subclass and is now natively supported by torch.compile as an opaque "
        "value type. Calling register_constant() on Enum subclasses is deprecated"
    )
    with caplog.at_level(logging.WARNING, logger="torch.utils._pytree"):
        pytree.warning(notice, KernelPreference)
        pytree.warning(notice, Mine)  # not torchao's: shown
        pytree.warning("another pytree warning")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "Mine" in messages[0] and messages[1] == "another pytree warning"


def test_no_hf_progress_bars_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    try:
        console_mod.quiet_dependency_output()
        assert not hf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    finally:
        hub_utils.enable_progress_bars()
        hf_logging.enable_progress_bar()
