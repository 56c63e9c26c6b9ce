"""Fused SwiGLU activation `silu(gate) * up` (forward and backward) in Triton.

HF's eager MLP saves four [tokens, intermediate] tensors for backward (gate, silu(gate), up
and the product); this saves gate and up only and recomputes the sigmoid in backward,
whose gradients are written over gate and up in place (nothing else reads them then).

On CPU the kernels run under TRITON_INTERPRET=1 (tests); import this module only after that
variable is set.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(A, B, C, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0)
    silu = (a * tl.sigmoid(a)).to(b.dtype)  # HF rounds silu(gate) before the product
    tl.store(C + offs, (silu.to(tl.float32) * b.to(tl.float32)).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DC, A, B, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dc * b * (sig + silu * (1.0 - sig))
    db = dc * silu
    tl.store(A + offs, da.to(A.dtype.element_ty), mask=mask)  # in place: gate is done with
    tl.store(B + offs, db.to(B.dtype.element_ty), mask=mask)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must match")
        gate, up = gate.contiguous(), up.to(gate.dtype).contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx: Any, dc: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dc = dc.contiguous()
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dc, gate, up, n, BLOCK=BLOCK)
        return gate, up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """`silu(gate) * up`, fused; backward overwrites the saved gate and up in place."""
    return _SiluMul.apply(gate, up)
