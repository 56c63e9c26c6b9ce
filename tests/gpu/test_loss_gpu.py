"""The chunked head loss on CUDA: Triton kernel and bf16 products against float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sftkit.train.loss as loss_mod
from sftkit.train.loss import chunked_nll_sum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_bf16_head_loss_matches_float32_reference() -> None:
    # The GPU path: Triton loss-and-gradient kernel and float32 head-gradient accumulation
    # from bf16 products (addmm with out_dtype where this torch has it).
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3000, 64, generator=g)
    weight = 0.1 * torch.randn(5000, 64, generator=g)
    labels = torch.randint(0, 5000, (3000,), generator=g)
    labels[::5] = -100
    h16 = hidden.cuda().bfloat16().requires_grad_()
    w16 = weight.cuda().bfloat16().requires_grad_()
    got = chunked_nll_sum(h16, w16, labels.cuda(), chunk_size=512)
    got.backward()
    h32 = h16.detach().float().requires_grad_()
    w32 = w16.detach().float().requires_grad_()
    ref = F.cross_entropy(h32 @ w32.T, labels.cuda(), reduction="sum")
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-2)
    for a, b in ((h16.grad, h32.grad), (w16.grad, w32.grad)):
        scale = float(b.abs().max())
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * scale)
    assert isinstance(loss_mod._addmm_out_dtype_works("cuda", torch.bfloat16), bool)
