"""What stops a run early (`sftkit.lifecycle.signals`) and when validation runs
(`train.validation.Validator`), without a run."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sftkit.data.loader import rank_share
from sftkit.lifecycle import signals
from sftkit.lifecycle.signals import Deadline, StopFlag, preempted_marker
from sftkit.train.validation import Validator


def test_deadline_leaves_room_for_two_steps_and_a_save(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: now[0])
    deadline = Deadline(60.0, started=100.0)
    deadline.last_save = 5.0
    now[0] = 140.0  # 40 s in; a 6 s step: 40 + 12 + 5 = 57 < 60
    assert not deadline.near(step_started=134.0)
    now[0] = 144.0  # 44 s in; a 6 s step: 44 + 12 + 5 = 61 >= 60
    assert deadline.near(step_started=138.0)
    assert not Deadline(None).near(step_started=0.0)


def test_stop_flag_names_its_signal() -> None:
    flag = StopFlag()
    assert flag.reason == ""
    flag._handle(signal.SIGUSR1, None)
    assert flag.reason == "signal SIGUSR1"
    flag.interrupt = True
    with pytest.raises(signals.Preempted):
        flag._handle(signal.SIGTERM, None)


def test_marker_path_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(signals.MARKER_ENV, raising=False)
    assert preempted_marker(tmp_path) == tmp_path / ".preempted"
    monkeypatch.setenv(signals.MARKER_ENV, str(tmp_path / "elsewhere"))
    assert preempted_marker(tmp_path) == tmp_path / "elsewhere"


def test_training_and_validation_share_batches_the_same_way() -> None:
    assert [rank_share(list(range(8)), r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # a short last validation batch: contiguous, the first ranks take one more
    assert [rank_share(list(range(5)), r, 3) for r in range(3)] == [[0, 1], [2, 3], [4]]
    assert [rank_share([7], r, 2) for r in range(2)] == [[7], []]


@pytest.mark.parametrize(
    ("period", "at_end", "examples", "steps"),
    [(2, False, [1], [2, 4]), (0, True, [1], [5]), (3, True, [1], [3, 5]), (2, True, [], [])],
)
def test_validator_schedule(
    period: int, at_end: bool, examples: list[Any], steps: list[int]
) -> None:
    cfg: Any = SimpleNamespace(sft=SimpleNamespace(val_period=period, val_at_end=at_end))
    validator = Validator(cfg, None, None, None, examples, None, None, None, None)  # type: ignore[arg-type]
    assert [s for s in range(1, 6) if validator.should_validate(s, last_step=s == 5)] == steps


def test_repeated_signals_during_setup_raise_once() -> None:
    """`timeout` and a process-group kill deliver SIGTERM twice: a second Preempted raised
    inside the first one's handling ended in a traceback, exit 1 and no marker."""
    flag = StopFlag(interrupt=True)
    with pytest.raises(signals.Preempted):
        flag._handle(signal.SIGTERM, None)
    flag._handle(signal.SIGTERM, None)  # the duplicate: recorded, not raised
    flag._handle(signal.SIGUSR1, None)
    assert flag.reason == "signal SIGTERM"


def test_ctrl_c_stops_like_sigterm_and_twice_aborts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [10.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: now[0])
    flag = StopFlag()
    flag.install()
    try:
        assert signal.getsignal(signal.SIGINT) == flag._handle  # not Python's KeyboardInterrupt
    finally:
        flag.restore()
    with caplog.at_level("WARNING", logger="sftkit"):
        flag._handle(signal.SIGINT, None)  # the first Ctrl-C: save and stop
    assert flag.reason == "signal SIGINT" and "Ctrl-C: stopping after this step" in caplog.text
    now[0] += 0.3  # the launcher's copy of the same Ctrl-C (self-launch, torchrun)
    flag._handle(signal.SIGTERM, None)
    flag._handle(signal.SIGINT, None)
    now[0] += signals.REPEAT_WINDOW_S  # the user presses again: abort
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)


def test_abort_is_one_line_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    from sftkit.errors import EXIT_ABORTED, run_reporting_errors

    def body() -> int:
        raise KeyboardInterrupt

    assert run_reporting_errors(body) == EXIT_ABORTED == 130
    assert capsys.readouterr().err == "Aborted (Ctrl-C): nothing saved\n"
