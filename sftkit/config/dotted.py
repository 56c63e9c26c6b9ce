"""Dotted import paths, the escape hatch of every component table (optimizers, schedulers,
tensor-parallel plans): `package.module.Name` names any importable object."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(dotted: str, key: str) -> Any:
    """Import `package.module.Name`; errors name the config key that held the path."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"{key}={dotted!r} is not a dotted path like 'torch.optim.AdamW'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{key}={dotted!r} cannot be imported: {err}") from err
