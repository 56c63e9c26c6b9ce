"""Cross-entropy loss and logit gradient in one Triton kernel, written over the logits.

The chunked head loss (`sftkit.train.loss`) needs, per chunk of C tokens, the summed NLL and
`softmax(logits) - onehot(label)`. In PyTorch that is about nine passes over the [C, V]
block (upcast, logsumexp, subtract, exp, scatter, mask, and two downcasts for the two
gradient matmuls), each at least a float32 [C, V] read or write: at V = 128k and C = 1024,
about 6 GB of memory traffic per chunk. This kernel reads the block (in the matmul's dtype)
twice and writes the gradient once, in place and in that same dtype, so the gradient
matmuls use it directly and no float32 [C, V] copy ever exists. The maths is float32
(online max / sum-exp, as Liger's and Apple's fused CE kernels do).

On CPU the kernel runs under TRITON_INTERPRET=1 (tests); import this module only after that
variable is set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Columns per loop iteration: 128k-vocab rows take 4 iterations per pass; a 32k-wide block
# of float32 is 128 KiB of registers across 32 warps (Liger uses the same width).
MAX_BLOCK = 32768


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, LABELS, NLL, stride, n_cols, ignore_index,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    # Pass 1: running max and sum of exp(x - max) over the row.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe = tl.where(valid, label, 0)
    target = tl.load(ptr + safe).to(tl.float32)  # read before pass 2 overwrites it
    tl.store(NLL + row, tl.where(valid, lse - target, 0.0))
    # Pass 2: d(NLL)/d(logits) = softmax - onehot(label), zero on ignored rows.
    keep = tl.where(valid, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == safe, 1.0, 0.0)
        tl.store(ptr + cols, (grad * keep).to(LOGITS.dtype.element_ty), mask=mask)


def ce_loss_and_grad_(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed NLL of `labels` under `logits` [N, V]; overwrites `logits` with d(sum)/d(logits).

    The gradient is `softmax(logits) - onehot(labels)` (zero on rows whose label is
    `ignore_index`), stored in the logits' own dtype. Returns a float32 scalar.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a row-major [N, V] matrix, got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits rows {logits.shape[0]}")
    n_rows, n_cols = logits.shape
    nll = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return nll.sum()
    block = min(MAX_BLOCK, triton.next_power_of_2(n_cols))
    _ce_loss_grad_kernel[(n_rows,)](
        logits, labels.contiguous(), nll, logits.stride(0), n_cols, ignore_index,
        BLOCK=block, num_warps=32 if block >= 8192 else 8,
    )  # fmt: skip
    return nll.sum()


@triton.jit
def _scale_cast_kernel(SRC, SCALE, DST, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(SRC + offs, mask=mask).to(tl.float32) * tl.load(SCALE).to(tl.float32)
    tl.store(DST + offs, x.to(DST.dtype.element_ty), mask=mask)


def scale_cast(src: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`(src * scale).to(dtype)` in one pass, `scale` a 0-dim tensor on src's device.

    The head gradient ([V, H] float32, 1 GiB at Llama-3's vocabulary) is scaled by the
    incoming loss gradient and cast to the weight's dtype once per step. In PyTorch that is
    a cast then a multiply by a 0-dim device tensor, which takes torch's slow broadcasting
    path; here it is one read and one write (and a single rounding).
    """
    src = src.contiguous()
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    if n:
        block = 4096
        _scale_cast_kernel[(triton.cdiv(n, block),)](src, scale, out, n, BLOCK=block)
    return out
