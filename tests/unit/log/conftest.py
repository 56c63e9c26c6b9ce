"""Keep logging configuration changes made by one test out of the others."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = {}
    for name in ("", "sftkit"):
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), list(logger.filters), logger.level)
    yield
    for name, (handlers, filters, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.filters[:] = handlers, filters
        logger.setLevel(level)
        for handler in handlers:
            handler.filters[:] = [
                f for f in handler.filters if type(f).__name__ != "RedactingFilter"
            ]
