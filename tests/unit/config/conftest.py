"""Fixtures shared by the config tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write `text` to `tmp_path/name` (parents created) and return the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write
