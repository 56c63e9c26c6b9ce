"""One error path for every command: one scrubbed message on stderr and a fixed exit code."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from sftkit.checkpoint.layout import ResumeMismatchError
from sftkit.cli import main as cli_main
from sftkit.config import ConfigError
from sftkit.data.errors import DataError
from sftkit.errors import ArgumentParser, NonFiniteError, classify, install_excepthook, report_error

SECRET = "hf_abcdefSECRET0123456789"


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("SFTKIT_TRACEBACK", raising=False)
    return SECRET


@pytest.mark.parametrize(
    ("error", "code", "label"),
    [
        (ConfigError("bad key"), 2, "Config error"),
        (DataError("x.jsonl:2", "malformed JSON line", "fix it"), 2, "Error"),
        (ResumeMismatchError("different data"), 2, "Error"),
        (ValueError("bad setting"), 2, "Error"),
        (ImportError("pip install wandb"), 2, "Error"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/nope"), 2, "Error"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "Error"),
        (NonFiniteError("non-finite loss"), 1, "Training stopped"),
        (ConnectionError("tracking server unreachable"), 1, "Error"),
        (OSError(errno.ENOSPC, "No space left on device"), 1, "Error"),
    ],
)
def test_known_errors_have_one_exit_code(error: BaseException, code: int, label: str) -> None:
    assert classify(error) == (code, label)


def test_bugs_are_not_swallowed() -> None:
    assert classify(KeyError("x")) is None and classify(RuntimeError("bug")) is None
    assert report_error(AttributeError("bug")) is None


def test_report_is_one_scrubbed_line(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_error(ValueError(f"policy.model_name={token!r} not found")) == 2
    err = capsys.readouterr().err
    assert err == "Error: policy.model_name='***' not found\n"


def test_traceback_on_request_is_scrubbed(
    token: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFTKIT_TRACEBACK", "1")
    try:
        raise ValueError(f"token {token}")
    except ValueError as err:
        assert report_error(err) == 2
    err_text = capsys.readouterr().err
    assert "Traceback" in err_text and token not in err_text


def test_unexpected_error_traceback_is_scrubbed(
    token: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install_excepthook()
    install_excepthook()  # idempotent: one hook
    try:
        raise RuntimeError(f"a bug with {token} in it")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "RuntimeError: a bug with *** in it" in err and token not in err


def test_argparse_errors_are_scrubbed(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = ArgumentParser(prog="x")
    parser.add_argument("--num", type=int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--num", token])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int value: '***'" in err and token not in err


def _no_checkpoint(tmp_path: Path, secret: str) -> list[str]:
    return [str(tmp_path / f"run-{secret}"), str(tmp_path / "out")]


# A secret-looking value given where a number is expected: the config error would echo it.
COMMANDS = {
    "sft": lambda tmp, s: [f"sft.seed={s}"],
    "sft-override-typo": lambda tmp, s: [f"policy.max_total_sequence_length={s}x"],
    "preview": lambda tmp, s: [f"sft.seed={s}"],
    "preview-argument": lambda tmp, s: ["--num", s],
    "eval": lambda tmp, s: [f"generation.max_new_tokens={s}"],
    "eval-choice": lambda tmp, s: [f"eval.metric={s}"],
    "export": _no_checkpoint,
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_every_command_scrubs_its_errors(
    case: str, token: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = case.split("-")[0]
    args = COMMANDS[case](tmp_path, token)
    try:
        code = cli_main([command, *args])
    except SystemExit as exit_info:  # argparse
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    assert token not in captured.err and token not in captured.out
    assert "***" in captured.err  # the message is there, with the secret replaced
    assert "Traceback" not in captured.err
