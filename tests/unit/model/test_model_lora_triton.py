"""The fused Triton LoRA kernels equal the PyTorch path (values and grads), on CPU.

Triton's interpreter (TRITON_INTERPRET=1) must be set before triton is imported, so the
comparison runs in a fresh subprocess with that environment.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    import sftkit.model.kernels.lora as K
    from sftkit.model.lora import LoraSpec, apply_lora

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = K.lora_forward_add_, K.lora_backward_dx_add_
    def count_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)
    def count_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)
    K.lora_forward_add_, K.lora_backward_dx_add_ = count_fwd, count_bwd

    def layer(use_triton, dropout, position):
        torch.manual_seed(0)
        seq = nn.Sequential(nn.Linear(72, 136))  # not multiples of the block sizes
        apply_lora(seq, LoraSpec(dim=5, alpha=10, dropout=dropout,
                                 dropout_position=position, use_triton=use_triton))
        nn.init.normal_(seq[0].lora_B.weight)
        return seq[0].train()

    def run(use_triton, dropout, position, x_grad):
        m = layer(use_triton, dropout, position)
        torch.manual_seed(1)
        x = torch.randn(3, 31, 72).requires_grad_(x_grad)
        torch.manual_seed(2)
        y = m(x)
        wanted = [m.lora_A.weight, m.lora_B.weight] + ([x] if x_grad else [])
        return [y] + list(torch.autograd.grad((y * y).sum(), wanted))

    for dropout, position, x_grad in [(0.0, "post", True), (0.0, "post", False),
                                      (0.3, "pre", True), (0.3, "post", True)]:
        ref = run(False, dropout, position, x_grad)
        got = run(True, dropout, position, x_grad)
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
    assert calls["fwd"] >= 4 and calls["bwd"] >= 3, calls
    print("OK", calls)
    """
)


@pytest.mark.slow
def test_triton_kernels_equal_torch_path(run_triton_interpreted: Any) -> None:
    run_triton_interpreted(SCRIPT)
