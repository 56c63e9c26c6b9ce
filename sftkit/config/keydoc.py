"""`doc()`: a schema field with its one-line doc in the field's metadata, so the schema is
the one source of key docs (`sftkit.config.keys` prints them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any


def doc(
    default: Any = MISSING,
    text: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    nemo: bool = True,
) -> Any:
    """A field with its one-line doc, printed by `sftkit keys`; `nemo=False`: sftkit's own key."""
    metadata = {"doc": text, "nemo": nemo}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
