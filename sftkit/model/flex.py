"""torch's flex attention, imported lazily and compiled once on CUDA: shared by packed
attention (`attention.py`) and context parallelism (`context_parallel.py`), which both
import it from here so that neither imports the other's module for it."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


@functools.cache
def flex_api() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """(create_block_mask, flex_attention), imported lazily: importing it pulls in
    torch._dynamo, about 7 s on a 2-core CPU."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    return create_block_mask, flex_attention


_compiled_flex: Callable[..., Tensor] | None = None


def flex(query: Tensor, key: Tensor, value: Tensor, **kwargs: Any) -> Tensor:
    global _compiled_flex
    flex_attention = flex_api()[1]  # type: ignore[index]
    if query.device.type != "cuda":
        with warnings.catch_warnings():  # the unfused CPU path warns on every call
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(query, key, value, **kwargs)
    if _compiled_flex is None:
        # Default dynamic=None: after the first new row length, shapes become symbolic instead
        # of one recompile per length (varying per-bin row lengths would hit the limit of 8).
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(query, key, value, **kwargs)
