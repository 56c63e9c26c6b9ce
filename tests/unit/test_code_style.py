"""The code style rules CI keeps: ruff- and mypy-clean package, files under 600 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def test_python_files_stay_under_the_size_limit() -> None:
    too_long = {
        str(path.relative_to(REPO)): n
        for path in (REPO / "sftkit").rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"split these by concern (files under 600 lines): {too_long}"


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "sftkit", "examples", "bench", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    # Settings in pyproject.toml ([tool.mypy]: the sftkit package, third-party imports silent).
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
