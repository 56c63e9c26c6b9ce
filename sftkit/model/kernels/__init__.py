"""Fused GPU kernels (Triton). Importing this package never imports Triton."""

from __future__ import annotations

import functools
import importlib.util
import os


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors (tests only, slow)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    """Triton is installed (its kernels still need CUDA tensors, or the interpreter)."""
    return importlib.util.find_spec("triton") is not None


def lora_triton_available() -> bool:
    """Whether the fused LoRA kernels can run: Triton installed and CUDA (or the interpreter)."""
    if not triton_available():
        return False
    import torch

    return torch.cuda.is_available() or triton_interpreting()
