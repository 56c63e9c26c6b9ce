"""Fused rotary position embedding for q and k (forward and backward) in Triton.

HF's `apply_rotary_pos_emb` runs about ten kernels (two `rotate_half` concatenations, four
products, two sums) and saves q, k, cos and sin. Here one program rotates every q and k head
of one token, and backward is the same rotation by -sin, so only cos and sin (shared by all
layers) are saved. Outputs are laid out [batch, seq, heads, head_dim] and returned as the
usual [batch, heads, seq, head_dim] view, which the varlen attention flattens for free.

Assumes HF's layout of cos/sin (`cat(freqs, freqs)`: both halves equal), true for Llama,
Qwen2/3 and Mistral rotary embeddings, including llama3/yarn/linear scaling.

On CPU the kernels run under TRITON_INTERPRET=1 (tests); import this module only after that
variable is set.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate_heads(
    X, Y, COS, SIN, b, t, n_heads, half,
    sxb, sxh, sxt, syb, syh, syt,
    SIGN: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, DP)[None, :]
    mask = (h < n_heads) & (d < half)
    x_ptr = X + b * sxb + t * sxt + h * sxh + d
    y_ptr = Y + b * syb + t * syt + h * syh + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + d, mask=d < half, other=0.0).to(tl.float32)
    s = tl.load(SIN + d, mask=d < half, other=0.0).to(tl.float32) * SIGN
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, seq_len, n_q, n_k, half,
    sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, scb, sct,
    SIGN: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // seq_len
    t = pid % seq_len
    cos = COS + b * scb + t * sct
    sin = SIN + b * scb + t * sct
    _rotate_heads(Q, QO, cos, sin, b, t, n_q, half, sqb, sqh, sqt, sqob, sqoh, sqot,
                  SIGN, HQ, DP)  # fmt: skip
    _rotate_heads(K, KO, cos, sin, b, t, n_k, half, skb, skh, skt, skob, skoh, skot,
                  SIGN, HK, DP)  # fmt: skip


def _launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, sign: int) -> tuple[Tensor, Tensor]:
    """Rotate q, k ([B, H, T, D], any strides with unit last stride) by angle sign * theta."""
    batch, n_q, seq_len, dim = q.shape
    n_k = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    # [B, T, H, D] storage, viewed as [B, H, T, D]: what q_proj(x).view().transpose() gives.
    qo = torch.empty((batch, seq_len, n_q, dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    ko = torch.empty((batch, seq_len, n_k, dim), dtype=k.dtype, device=k.device).transpose(1, 2)
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)  # one table broadcast over the batch
    _rope_kernel[(batch * seq_len,)](
        q, k, qo, ko, cos, sin, seq_len, n_q, n_k, dim // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        scb, cos.stride(1),
        SIGN=sign, HQ=triton.next_power_of_2(n_q), HK=triton.next_power_of_2(n_k),
        DP=triton.next_power_of_2(dim // 2),
    )  # fmt: skip
    return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, 1)

    @staticmethod
    def backward(ctx: Any, dq: Tensor, dk: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _launch(dq, dk, cos, sin, -1)
        return dq_in, dk_in, None, None


def rope_supported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `apply_rope` handles these shapes (else use HF's function)."""
    return (
        q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.stride(-1) == 1
        and sin.stride() == cos.stride()
        and q.shape[-1] % 2 == 0
        and cos.shape[-1] == q.shape[-1] == k.shape[-1]
        and cos.shape[1] == q.shape[2] == k.shape[2]
        and cos.shape[0] in (1, q.shape[0])
        and q.shape[0] == k.shape[0]
    )


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1), fused.

    q: [B, Hq, T, D], k: [B, Hk, T, D], cos/sin: [B or 1, T, D] with equal halves.
    """
    return _Rope.apply(q, k, cos, sin)
