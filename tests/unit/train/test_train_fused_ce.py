"""The one-kernel Triton loss-and-gradient equals PyTorch's cross-entropy, alone and in the
chunked head loss (values and gradients), on CPU under Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the checks run in one fresh
subprocess with that environment (small shapes; the block width is lowered so that every
row spans several blocks, as 128k-vocab rows do on a GPU).
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    import sftkit.model.kernels.cross_entropy as CE
    from sftkit.train.loss import chunked_nll_sum

    CE.MAX_BLOCK = 64  # 300-wide rows take 5 blocks per pass
    torch.manual_seed(0)

    # The kernel alone: loss, and the gradient written over the logits in their dtype.
    labels = torch.tensor([0, 5, 299, -100, 17, 150, 64])
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        logits = (4 * torch.randn(7, 300)).to(dtype)
        ref = logits.float().requires_grad_(True)
        ref_nll = F.cross_entropy(ref, labels, reduction="sum")
        ref_nll.backward()
        got = logits.clone()
        nll = CE.ce_loss_and_grad_(got, labels)
        assert nll.dtype == torch.float32 and got.dtype == dtype
        torch.testing.assert_close(nll, ref_nll.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.float(), ref.grad, rtol=tol, atol=tol)
        assert got[3].abs().max() == 0  # the ignored row has no gradient
    assert float(CE.ce_loss_and_grad_(torch.zeros(0, 300), labels[:0])) == 0.0

    # In the chunked head loss (chunk boundaries, bias, ignored targets), against the plain
    # float32 loss.
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    bias = torch.randn(300, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    targets[::4] = -100
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    ref = torch.autograd.grad(plain, (hidden, weight, bias))
    fused = chunked_nll_sum(hidden, weight, targets, chunk_size=10, lm_head_bias=bias,
                            fused_ce=True)
    got = torch.autograd.grad(2.0 * fused, (hidden, weight, bias))
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-4)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, 2.0 * r, rtol=1e-4, atol=1e-4)

    # A bf16 head: its float32 gradient is scaled and cast in one kernel (scale_cast).
    w16 = weight.detach().bfloat16().requires_grad_(True)
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    plain16 = F.cross_entropy(F.linear(h16, w16).float(), targets, reduction="sum")
    ref16 = torch.autograd.grad(0.5 * plain16, w16)[0]
    fused16 = chunked_nll_sum(h16, w16, targets, chunk_size=10, fused_ce=True)
    got16 = torch.autograd.grad(0.5 * fused16, w16)[0]
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), ref16.float(), rtol=2e-2, atol=2e-2)
    src = torch.randn(5000)
    cast = CE.scale_cast(src, torch.tensor(0.25), torch.bfloat16)
    assert cast.dtype == torch.bfloat16  # within one bf16 step (the interpreter may truncate)
    torch.testing.assert_close(cast.float(), src * 0.25, rtol=2**-7, atol=0)
    print("OK")
    """
)


@pytest.mark.slow
def test_fused_ce_kernel_equals_cross_entropy(run_triton_interpreted: Any) -> None:
    run_triton_interpreted(SCRIPT)
