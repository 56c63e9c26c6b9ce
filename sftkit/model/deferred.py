"""Imports of optional packages that transformers makes at start-up and sftkit defers.

transformers 5.25's `quantizers/quantizer_torchao.py` imports
`torchao.prototype.safetensors.safetensors_support` whenever torchao is installed (the
`fp8` extra, the dev group), which imports all of torchao: 0.3-0.5 CPU-s per process
(3.2 s wall on a loaded 2-core machine) before the first step, for a function used only
when saving a torchao-quantized model. `defer_torchao` puts a stand-in module there whose
names load the real module on first use. Can go when transformers imports it lazily.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

TORCHAO_SAFETENSORS = "torchao.prototype.safetensors.safetensors_support"
# The names transformers 5.25 imports from it; any other name loads the real module at once.
_FORWARDED = ("flatten_tensor_state_dict",)


def _real(name: str) -> types.ModuleType:
    """The real module, imported now in place of its stand-in."""
    module = sys.modules.get(name)
    if module is None or getattr(module, "_sftkit_deferred", False):
        sys.modules.pop(name, None)
        module = importlib.import_module(name)
    return module


def _stand_in(name: str, forwarded: tuple[str, ...]) -> types.ModuleType:
    stand_in = types.ModuleType(name, f"Stand-in for {name}, loaded on first use (sftkit).")
    stand_in._sftkit_deferred = True  # type: ignore[attr-defined]

    def forward(attr: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(_real(name), attr)(*args, **kwargs)

        call.__name__ = attr
        return call

    for attr in forwarded:
        setattr(stand_in, attr, forward(attr))

    def other(attr: str) -> Any:
        if attr.startswith("__"):  # the import system probes `__path__` and others
            raise AttributeError(attr)
        return getattr(_real(name), attr)

    stand_in.__getattr__ = other  # type: ignore[method-assign]
    return stand_in


def defer(name: str, forwarded: tuple[str, ...]) -> bool:
    """Put a stand-in for module `name` (its `forwarded` functions, and any other name on
    first use, load the real module) where its package is installed and not imported yet;
    returns whether it did."""
    package = name.split(".")[0]
    if name in sys.modules or package in sys.modules:
        return False
    if importlib.util.find_spec(package) is None:
        return False
    sys.modules[name] = _stand_in(name, forwarded)
    return True


def defer_torchao() -> bool:
    """The stand-in for transformers' torchao import. torchao's own imports (`torchao.float8`
    for `fp8_cfg`) are unaffected: torchao never imports that module itself."""
    return defer(TORCHAO_SAFETENSORS, _FORWARDED)
