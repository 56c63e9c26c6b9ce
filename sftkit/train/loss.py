"""Token NLL without full logits: chunked linear + cross-entropy, and the model glue.

The [tokens, vocab] float32 logits are where SFT memory goes: 32k tokens x 128k vocab is
15.7 GiB in fp32, twice that with its gradient (`reference/perf.md` section 3). Here the
head and the cross-entropy run `chunk_size` tokens at a time, and the gradient of each chunk
is computed right away in the forward (as Liger's fused linear CE does), so only one
[chunk, vocab] float32 block is alive at any time and the backward is a scaling.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftkit.data.packing import IGNORE_INDEX, PackedBatch


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # Matmul in the parameter dtype (bf16 on GPU: tensor cores), softmax maths in float32.
    return F.linear(hidden, weight, bias).float()


def _chunk_nll_and_grad(
    logits: Tensor, labels: Tensor, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Summed NLL of a chunk, and d(sum NLL)/d(logits) when `want_grad` (float32)."""
    valid = labels != IGNORE_INDEX
    safe = labels.masked_fill(~valid, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    nll = ((lse - target) * valid).sum()
    if not want_grad:
        return nll, None
    grad = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place: logits are done with
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    grad.mul_(valid[:, None])
    return nll, grad


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token NLL of `hidden @ weight.T + bias`; gradients computed chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk_size: int,
    ) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 accumulation across chunks: summing many bf16 partial products in bf16
        # would lose low bits of the head gradient (costs 4 bytes per head parameter).
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = (
            torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            logits = _chunk_logits(h, weight, bias)
            nll, grad = _chunk_nll_and_grad(logits, labels[start : start + chunk_size], True)
            total += nll
            assert grad is not None
            if grad_h is not None:
                grad_h[start : start + chunk_size] = grad.to(weight.dtype) @ weight
            if grad_w is not None:
                # In-place addmm skips autocast, so it is only the fast path without autocast.
                if h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
                    grad_w.addmm_(grad.t(), h)
                else:
                    grad_w += (grad.t().to(h.dtype) @ h).float()
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        out_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        out_w = None
        if grad_w is not None:  # cast first for low-precision heads: no second fp32 [V, H]
            out_w = grad_w * scale if w_dtype == torch.float32 else grad_w.to(w_dtype).mul_(scale)
        out_b = None if grad_b is None else (grad_b * scale).to(b_dtype)
        return out_h, out_w, out_b, None, None


def chunked_nll_sum(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
) -> Tensor:
    """Sum over tokens of the NLL of `labels` under `hidden @ lm_head_weight.T (+ bias)`.

    `hidden` is [N, H], already aligned with its targets `labels` [N] (-100 is ignored).
    Returns a float32 scalar equal (value and gradient w.r.t. hidden, weight and bias) to
    `F.cross_entropy(hidden @ W.T, labels, reduction="sum")`, without ever holding more than
    one [chunk_size, V] block of float32 logits. Under no_grad only the value is computed.
    """
    if chunk_size < 1:
        raise ValueError(f"fused_loss_chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    tracked = [t for t in (hidden, lm_head_weight, lm_head_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _ChunkedLinearCrossEntropy.apply(
            hidden, lm_head_weight, lm_head_bias, labels, chunk_size
        )
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden[start : start + chunk_size], lm_head_weight, lm_head_bias)
        total += _chunk_nll_and_grad(logits, labels[start : start + chunk_size], False)[0]
    return total


def _check_plain_head(model: nn.Module) -> nn.Linear:
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} transforms its logits ({attr}={value}); the chunked "
                "loss assumes plain `hidden @ lm_head.weight.T` logits, so this model needs "
                "the plain loss path"
            )
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "model"):
        raise ValueError(
            f"{type(model).__name__} is not LlamaForCausalLM-like (a `.model` decoder body and "
            "an nn.Linear `.lm_head`); the chunked loss cannot split it"
        )
    if head.bias is not None:
        raise ValueError("lm_head has a bias, which model_hidden_and_head does not return")
    return head


def model_hidden_and_head(model: nn.Module, batch: PackedBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Run the decoder body; return (hidden at target positions [N, H], head weight, targets [N]).

    Assumes a LlamaForCausalLM-like model: `model.model` (decoder body, final norm included)
    then `model.lm_head` (nn.Linear, no bias, possibly tied to the input embeddings, which
    autograd handles since it is the same Parameter), with no logit softcapping or scaling
    (checked). Position t predicts `labels[t + 1]`; positions whose target is -100 are
    dropped before the head, so the head runs only on trained tokens. Packed batches need
    `sftkit.model.attention.enable_packed_attention(model)` first (checked).
    Under FSDP2 the caller must make sure `lm_head.weight` is unsharded (its own
    `fully_shard` unit's `unshard()`), since the head module's forward is not called here.
    """
    head = _check_plain_head(model)
    impl = getattr(model.config, "_attn_implementation", None)
    if batch.cu_seqlens is not None and impl != "sftkit_packed" and "flash" not in str(impl):
        raise ValueError(
            f"packed rows with attn_implementation={impl!r} would attend across documents; "
            "call sftkit.model.attention.enable_packed_attention(model) first"
        )
    out = model.model(**batch.model_kwargs(), use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[keep], head.weight, targets[keep]
