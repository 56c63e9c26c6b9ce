"""Config errors: one exception type whose message names the key, the value and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file or a command-line override.

    `path` is the dotted key the error is about (None for file-level errors) and `source`
    says where the bad value came from: a file or an override.
    """

    def __init__(self, message: str, *, path: str | None = None, source: str | None = None):
        super().__init__(message)
        self.path = path
        self.source = source
