"""The GPU monitor on a real device."""

from __future__ import annotations

import pytest
import torch

from sftkit.log import GpuMonitor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_real_sample_on_gpu() -> None:
    torch.ones(1024, 1024, device="cuda")
    sample = GpuMonitor(lambda m: None).sample()
    assert sample["gpu/torch_allocated_gb"] > 0
    assert any(name.endswith("/mem_total_gb") and value > 1 for name, value in sample.items())
