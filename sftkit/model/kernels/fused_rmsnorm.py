"""Fused RMSNorm (forward and backward) in Triton, with Llama's rounding order.

HF's LlamaRMSNorm runs about six kernels and saves the float32 copy of its input plus the
normalised tensor for backward; this runs one kernel each way and saves only the input and
one float32 inverse RMS per row. Forward: `y = w * (x * rstd).to(x.dtype)` in the promoted
dtype of x and w (as HF). Backward: `dx = rstd * (dn - n * mean(dn * n))` with `n = x *
rstd`, `dn = dy * w`; `dw` is summed per program in float32, then over programs.

On CPU the kernels run under TRITON_INTERPRET=1 (tests); import this module only after that
variable is set.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS_PER_PROGRAM = 16  # rows a backward program sums dw over before its one float32 write


@triton.jit
def _rmsnorm_fwd_kernel(
    X, W, Y, RSTD, n_cols, eps, sx, sy,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * sx + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # HF rounds before the weight
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, sdy, sx, sdx,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * sdy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = x * rstd
            dn = dy * w
            dw += dy * n
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
            tl.store(DX + row * sdx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)  # 8 warps for Llama-1B's 2048-wide rows


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        shape = x.shape
        x2 = _rows(x)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(x2.shape[1])
        _rmsnorm_fwd_kernel[(x2.shape[0],)](
            x2, weight, y, rstd, x2.shape[1], eps, x2.stride(0), y.stride(0), BLOCK=block,
            num_warps=_num_warps(block),
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*shape[:-1], shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        n_rows, n_cols = x2.shape
        dx = torch.empty_like(x2)
        programs = triton.cdiv(n_rows, ROWS_PER_PROGRAM)
        partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, partial, n_rows, n_cols,
            dy2.stride(0), x2.stride(0), dx.stride(0),
            ROWS=ROWS_PER_PROGRAM, BLOCK=triton.next_power_of_2(n_cols),
            num_warps=_num_warps(triton.next_power_of_2(n_cols)),
        )  # fmt: skip
        dw = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` over the last dim, fused."""
    return _RMSNorm.apply(x, weight, eps)
