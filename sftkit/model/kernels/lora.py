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
def _lora_fwd_kernel(
    X, A, B, OUT, M, K, N, R, scale,
    sxm, sxk, sar, sak, sbn, sbr, som, son,
    RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    SPLIT, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # fmt: skip
        a = tl.load(A + rr[None, :] * sar + rk[:, None] * sak,
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)  # fmt: skip
        if IEEE:
            acc += tl.dot(x, a, input_precision="ieee")
        else:
            acc += tl.dot(x, a)
    xa = acc.to(X.dtype.element_ty)  # rounded like a matmul in the input dtype would be
    n_blocks = tl.cdiv(N, BN)
    for nb in range(pid_n, n_blocks, SPLIT):
        rn = nb * BN + tl.arange(0, BN)
        b = tl.load(B + rn[None, :] * sbn + rr[:, None] * sbr,
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)  # fmt: skip
        if IEEE:
            y = tl.dot(xa, b, input_precision="ieee")
        else:
            y = tl.dot(xa, b)
        ptrs = OUT + rm[:, None] * som + rn[None, :] * son
        omask = (rm[:, None] < M) & (rn[None, :] < N)
        o = tl.load(ptrs, mask=omask, other=0.0).to(tl.float32)
        tl.store(ptrs, (o + y * scale).to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _lora_bwd_dx_kernel(
    G, B, A, DX, GB, M, N, K, R, scale,
    sgm, sgn, sbn, sbr, sar, sak, sdm, sdk, sgbm, sgbr,
    RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        g = tl.load(G + rm[:, None] * sgm + rn[None, :] * sgn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # fmt: skip
        b = tl.load(B + rn[:, None] * sbn + rr[None, :] * sbr,
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)  # fmt: skip
        if IEEE:
            acc += tl.dot(g, b, input_precision="ieee")
        else:
            acc += tl.dot(g, b)
    gb = acc.to(G.dtype.element_ty)
    if pid_k == 0:
        tl.store(GB + rm[:, None] * sgbm + rr[None, :] * sgbr, gb,
                 mask=(rm[:, None] < M) & (rr[None, :] < R))  # fmt: skip
    k_blocks = tl.cdiv(K, BK)
    for kb in range(pid_k, k_blocks, SPLIT):
        rk = kb * BK + tl.arange(0, BK)
        a = tl.load(A + rr[:, None] * sar + rk[None, :] * sak,
                    mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)  # fmt: skip
        if IEEE:
            y = tl.dot(gb, a, input_precision="ieee")
        else:
            y = tl.dot(gb, a)
        ptrs = DX + rm[:, None] * sdm + rk[None, :] * sdk
        dmask = (rm[:, None] < M) & (rk[None, :] < K)
        d = tl.load(ptrs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(ptrs, (d + y * scale).to(DX.dtype.element_ty), mask=dmask)


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


def lora_forward_add_(out: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """out[M, N] += scale * (x[M, K] A[R, K]^T) B[N, R]^T, in place; returns out."""
    _check(out, x, A, B)
    M, K = x.shape
    N, R = B.shape
    m_blocks, n_blocks = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_W)
    split = _split(m_blocks, n_blocks, x.device)
    _lora_fwd_kernel[(m_blocks, split)](
        x, A, B, out, M, K, N, R, float(scale),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        out.stride(0), out.stride(1),
        RP=_rank_block(R), BM=BLOCK_M, BK=BLOCK_RED, BN=BLOCK_W, SPLIT=split,
        IEEE=x.dtype == torch.float32,
    )  # fmt: skip
    return out


def lora_backward_dx_add_(dx: Tensor, g: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """dx[M, K] += scale * (g[M, N] B[N, R]) A[R, K], in place; returns g B ([M, R])."""
    _check(dx, g, A, B)
    M, N = g.shape
    K = A.shape[1]
    R = A.shape[0]
    gb = torch.empty(M, R, dtype=g.dtype, device=g.device)
    m_blocks, k_blocks = triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_W)
    split = _split(m_blocks, k_blocks, g.device)
    _lora_bwd_dx_kernel[(m_blocks, split)](
        g, B, A, dx, gb, M, N, K, R, float(scale),
        g.stride(0), g.stride(1), B.stride(0), B.stride(1), A.stride(0), A.stride(1),
        dx.stride(0), dx.stride(1), gb.stride(0), gb.stride(1),
        RP=_rank_block(R), BM=BLOCK_M, BN=BLOCK_RED, BK=BLOCK_W, SPLIT=split,
        IEEE=g.dtype == torch.float32,
    )  # fmt: skip
    return gb
