"""Fused Triton kernels for the LoRA branch (forward and the input gradient).

Forward: out += scale * (x A^T) B^T, in place on the base output. Each program keeps its
[BLOCK_M, r] tile of x A^T in registers and streams B and `out`, so x A^T is never
written to memory. Backward: dx += scale * (g B) A, in place on the base input gradient,
and g B ([M, r], small) is returned for dA; dA and dB are plain matmuls (reductions over
tokens, which cuBLAS does well). Programs are split along the wide dimension only as far
as needed to fill the GPU, so the tile of x A^T (or g B) is recomputed at most a few times.

On CPU the kernels run under TRITON_INTERPRET=1 (tests); import this module only after
that variable is set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 32  # token rows per program (small: many programs without splitting the wide side)
BLOCK_W = 128  # columns of the wide output (fwd) / input (bwd) per inner step
BLOCK_RED = 64  # reduction step over the wide dimension while building the [M, r] tile


@triton.jit
def _lora_kernel(
    X, U, V, OUT, TILE, M, K, N, R, scale,
    sxm, sxk, suk, sur, svr, svn, som, son, stm, st_r,
    RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    SPLIT, IEEE: tl.constexpr, STORE_TILE: tl.constexpr,
):  # fmt: skip
    """OUT[M, N] += scale * (X[M, K] U[K, R]) V[R, N]; with STORE_TILE, TILE[M, R] = X U.

    Forward and input gradient are both this product (U, V: A^T, B^T or B, A by strides).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # fmt: skip
        u = tl.load(U + rk[:, None] * suk + rr[None, :] * sur,
                    mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)  # fmt: skip
        if IEEE:
            acc += tl.dot(x, u, input_precision="ieee")
        else:
            acc += tl.dot(x, u)
    xu = acc.to(X.dtype.element_ty)  # rounded like a matmul in the input dtype would be
    if STORE_TILE:
        if pid_n == 0:
            tl.store(TILE + rm[:, None] * stm + rr[None, :] * st_r, xu,
                     mask=(rm[:, None] < M) & (rr[None, :] < R))  # fmt: skip
    n_blocks = tl.cdiv(N, BN)
    for nb in range(pid_n, n_blocks, SPLIT):
        rn = nb * BN + tl.arange(0, BN)
        v = tl.load(V + rr[:, None] * svr + rn[None, :] * svn,
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)  # fmt: skip
        if IEEE:
            y = tl.dot(xu, v, input_precision="ieee")
        else:
            y = tl.dot(xu, v)
        ptrs = OUT + rm[:, None] * som + rn[None, :] * son
        omask = (rm[:, None] < M) & (rn[None, :] < N)
        o = tl.load(ptrs, mask=omask, other=0.0).to(tl.float32)
        tl.store(ptrs, (o + y * scale).to(OUT.dtype.element_ty), mask=omask)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _split(m_blocks: int, wide_blocks: int, device: torch.device) -> int:
    """Programs per row block along the wide side: about two per SM, and no more, since
    each extra split re-reads the row block to rebuild its [BLOCK_M, r] tile."""
    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 2
    )
    return max(1, min(wide_blocks, (2 * sms) // m_blocks))


def _check(*tensors: Tensor) -> None:
    dtype = tensors[0].dtype
    assert all(t.dtype == dtype and t.dim() == 2 for t in tensors), "2-D tensors of one dtype"


def _product_add_(
    out: Tensor, x: Tensor, u: Tensor, v: Tensor, scale: float, tile: Tensor | None = None
) -> None:
    """out[M, N] += scale * (x[M, K] u[K, R]) v[R, N] in one launch; `tile` gets x u."""
    M, K = x.shape
    R, N = v.shape
    m_blocks, n_blocks = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_W)
    split = _split(m_blocks, n_blocks, x.device)
    t = out if tile is None else tile  # not written without a tile
    _lora_kernel[(m_blocks, split)](
        x, u, v, out, t, M, K, N, R, float(scale),
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), t.stride(0), t.stride(1),
        RP=_rank_block(R), BM=BLOCK_M, BK=BLOCK_RED, BN=BLOCK_W, SPLIT=split,
        IEEE=x.dtype == torch.float32, STORE_TILE=tile is not None,
    )  # fmt: skip


def lora_forward_add_(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """out[M, N] += scale * (x[M, K] A[R, K]^T) B[N, R]^T, in place; returns out."""
    _check(out, x, A, B)
    _product_add_(out, x, A.t(), B.t(), scale)
    return out


def lora_backward_dx_add_(dx: Tensor, g: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """dx[M, K] += scale * (g[M, N] B[N, R]) A[R, K], in place; returns g B ([M, R])."""
    _check(dx, g, A, B)
    gb = torch.empty(g.shape[0], A.shape[0], dtype=g.dtype, device=g.device)
    _product_add_(dx, g, B, A, scale, tile=gb)
    return gb
