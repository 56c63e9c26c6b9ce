"""Token NLL without full logits: chunked linear + cross-entropy, and the model glue.

The [tokens, vocab] float32 logits are where SFT memory goes: 32k tokens x 128k vocab is
15.7 GiB in fp32, twice that with its gradient (`docs/perf.md` section 4). Here the
head and the cross-entropy run `chunk_size` tokens at a time, and the gradient of each chunk
is computed right away in the forward (as Liger's fused linear CE does), so only one
[chunk, vocab] block is alive at any time and the backward is a scaling. On CUDA the loss
and the logit gradient of a chunk come from one Triton kernel that writes the gradient over
the bf16 logits (`sftkit.model.kernels.cross_entropy`), and the head gradient accumulates
in float32 straight from bf16 products (`addmm(..., out_dtype=float32)`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from sftkit.batch import IGNORE_INDEX, PackedBatch
from sftkit.model.kernels import triton_available


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # Matmul in the parameter dtype (bf16 on GPU: tensor cores); the loss maths is float32.
    return F.linear(hidden, weight, bias)


def _chunk_nll_and_grad(
    logits: Tensor, labels: Tensor, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Summed NLL of a chunk, and d(sum NLL)/d(logits) when `want_grad` (float32)."""
    logits = logits.float()
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


def _chunk_loss_and_grad_(logits: Tensor, labels: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """Summed NLL and its logit gradient in the logits' dtype (may overwrite `logits`)."""
    if fused:
        from sftkit.model.kernels.cross_entropy import ce_loss_and_grad_

        return ce_loss_and_grad_(logits, labels, IGNORE_INDEX), logits
    nll, grad = _chunk_nll_and_grad(logits, labels, True)
    assert grad is not None
    return nll, grad.to(logits.dtype)


@functools.cache
def _addmm_out_dtype_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(fp32, low, low, out_dtype=fp32, out=fp32)` runs and is right here.

    It is CUDA-only (torch >= 2.8); elsewhere, or if a build lacks it, the caller falls back
    to a low-precision product upcast and added (two extra [V, H] temporaries per chunk).
    """
    if device_type != "cuda":
        return False
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b, acc = (torch.randn(shape, generator=gen) for shape in ((8, 16), (16, 24), (8, 24)))
    expect = acc + a.to(dtype).float() @ b.to(dtype).float()
    acc, a, b = acc.to(device_type), a.to(device_type, dtype), b.to(device_type, dtype)
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return torch.allclose(acc.cpu(), expect, rtol=1e-3, atol=1e-3)


def _accumulate_head_grad_(grad_w: Tensor, grad: Tensor, hidden: Tensor) -> None:
    """`grad_w += grad.T @ hidden` in float32, without a float32 copy of the product if possible."""
    hidden = hidden.to(grad.dtype)  # float32 hidden under autocast meets a bf16 gradient
    if grad.dtype == torch.float32 and not torch.is_autocast_enabled(grad.device.type):
        grad_w.addmm_(grad.t(), hidden)  # in-place addmm skips autocast: only right here
    elif _addmm_out_dtype_works(grad.device.type, grad.dtype):
        torch.addmm(grad_w, grad.t(), hidden, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w += (grad.t() @ hidden).float()


def _use_fused_ce(logits_device: torch.device, weight: Tensor) -> bool:
    # The Triton kernel works on plain CUDA tensors; a tensor-parallel (DTensor) head or a
    # machine without Triton keeps the PyTorch path.
    return logits_device.type == "cuda" and triton_available() and not isinstance(weight, DTensor)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token NLL of `hidden @ weight.T + bias`; gradients computed chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk_size: int,
        fused: bool,
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
            nll, grad = _chunk_loss_and_grad_(logits, labels[start : start + chunk_size], fused)
            total += nll
            if grad_h is not None:
                grad_h[start : start + chunk_size] = grad @ weight  # autocast casts a fp32 head
            if grad_w is not None:
                _accumulate_head_grad_(grad_w, grad, h)
            if grad_b is not None:
                grad_b += grad.sum(0, dtype=torch.float32)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.fused = fused
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        out_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        out_w = None
        if grad_w is not None and w_dtype == torch.float32:
            out_w = grad_w * scale
        elif grad_w is not None and ctx.fused:
            from sftkit.model.kernels.cross_entropy import scale_cast

            out_w = scale_cast(grad_w, scale, w_dtype)
        elif grad_w is not None:  # cast first for low-precision heads: no second fp32 [V, H]
            out_w = grad_w.to(w_dtype).mul_(scale)
        out_b = None if grad_b is None else (grad_b * scale).to(b_dtype)
        return out_h, out_w, out_b, None, None, None


def chunked_nll_sum(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    lm_head_bias: Tensor | None = None,
    fused_ce: bool | None = None,
) -> Tensor:
    """Sum over tokens of the NLL of `labels` under `hidden @ lm_head_weight.T (+ bias)`.

    `hidden` is [N, H], already aligned with its targets `labels` [N] (-100 is ignored).
    Returns a float32 scalar equal (value and gradient w.r.t. hidden, weight and bias) to
    `F.cross_entropy(hidden @ W.T, labels, reduction="sum")`, without ever holding more than
    one [chunk_size, V] block of logits. Under no_grad only the value is computed.
    `fused_ce` picks the one-kernel Triton loss-and-gradient (`None`: on CUDA when Triton is
    installed; `True` also runs under TRITON_INTERPRET=1 on CPU, for tests).
    """
    if chunk_size < 1:
        raise ValueError(f"fused_loss_chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    tracked = [t for t in (hidden, lm_head_weight, lm_head_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        fused = _use_fused_ce(hidden.device, lm_head_weight) if fused_ce is None else fused_ce
        return _ChunkedLinearCrossEntropy.apply(
            hidden, lm_head_weight, lm_head_bias, labels, chunk_size, fused
        )
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden[start : start + chunk_size], lm_head_weight, lm_head_bias)
        total += _chunk_nll_and_grad(logits, labels[start : start + chunk_size], False)[0]
    return total


# Config fields by which HF causal LMs transform `lm_head(hidden)` before the loss (Gemma2/3
# softcapping, Cohere scale, Granite and Falcon-H1 muP scaling). The chunked loss computes
# plain `hidden @ W.T`, so such models take the plain loss path (`chunked_loss_blocker`).
LOGIT_TRANSFORMS: tuple[str, ...] = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
    "output_multiplier_scale",
)  # fmt: skip


def decoder_body(model: nn.Module) -> nn.Module | None:
    """The decoder body whose last hidden state feeds the head: `model.model` (Llama-style),
    else HF's `base_model` (`transformer` for GPT-2 style models); None if there is none."""
    body = getattr(model, "model", None)
    if isinstance(body, nn.Module):
        return body
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else None


def output_head(model: nn.Module) -> nn.Linear | None:
    """The output projection (`get_output_embeddings()`, e.g. `lm_head`) if it is an nn.Linear."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Linear) else None


def _logit_transform(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())
    for cfg in configs:
        for attr in LOGIT_TRANSFORMS:
            value = getattr(cfg, attr, None)
            if value not in (None, 1, 1.0):
                return f"{attr}={value}"
    return None


def chunked_loss_blocker(model: nn.Module) -> str | None:
    """Why the chunked loss cannot reproduce this model's logits, or None when it can.

    Checks the config for known logit transforms and the layout (a decoder body and an
    nn.Linear head without bias), then, on an unsharded model, compares the model's own
    logits with `body(...) @ head.weight.T` on a short probe: any transform the list above
    misses (a new family's scaling, a softcap hidden elsewhere) shows up there.
    """
    transform = _logit_transform(model)
    if transform is not None:
        return f"{type(model).__name__} transforms its logits ({transform})"
    body, head = decoder_body(model), output_head(model)
    if body is None or head is None:
        return f"{type(model).__name__} has no decoder body + nn.Linear output head"
    if head.bias is not None:
        return f"{type(model).__name__}'s output head has a bias"
    mismatch = _probe_mismatch(model, body, head)
    if mismatch is not None:
        return (
            f"{type(model).__name__}'s logits differ from `hidden @ head.weight.T` by "
            f"{mismatch:.3g} on a probe (an unlisted logit transform)"
        )
    return None


@torch.no_grad()
def _probe_mismatch(model: nn.Module, body: nn.Module, head: nn.Linear) -> float | None:
    """Largest |model logits - body hidden @ W.T| on 8 tokens, None when equal (or when the
    weights are sharded or on the meta device, where only the config check applies)."""
    weight = head.weight
    if isinstance(weight, DTensor) or weight.device.type == "meta":
        return None
    ids = (torch.arange(1, 9, device=weight.device) % weight.shape[0])[None]
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, use_cache=False).logits.float()
        hidden = body(input_ids=ids, use_cache=False).last_hidden_state
        mine = F.linear(hidden.to(weight.dtype), weight).float()
    finally:
        model.train(was_training)
    # The same F.linear on the same hidden state: equal up to the last bit in practice.
    err = float((full - mine).abs().max())
    return err if err > 1e-5 * max(1.0, float(full.abs().max())) else None


def _check_plain_head(model: nn.Module) -> nn.Linear:
    transform = _logit_transform(model)
    if transform is not None:
        raise ValueError(
            f"{type(model).__name__} transforms its logits ({transform}); the chunked "
            "loss assumes plain `hidden @ lm_head.weight.T` logits, so this model needs "
            "the plain loss path"
        )
    head = output_head(model)
    if head is None or decoder_body(model) is None:
        raise ValueError(
            f"{type(model).__name__} is not LlamaForCausalLM-like (a decoder body and an "
            "nn.Linear output head); the chunked loss cannot split it"
        )
    if head.bias is not None:
        raise ValueError("lm_head has a bias, which model_hidden_and_head does not return")
    return head


def model_hidden_and_head(model: nn.Module, batch: PackedBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Run the decoder body; return (hidden at target positions [N, H], head weight, targets [N]).

    Assumes a causal LM made of a decoder body (`model.model`, or HF's `base_model` such as
    GPT-2's `transformer`; final norm included) then an nn.Linear output head without bias
    (possibly tied to the input embeddings, which autograd handles since it is the same
    Parameter), with no logit softcapping or scaling (checked from the config here;
    `chunked_loss_blocker` also probes the logits). Position t predicts `labels[t + 1]`;
    positions whose target is -100 are dropped before the head, so the head runs only on
    trained tokens. Packed batches need
    `sftkit.model.attention.enable_packed_attention(model)` first (checked).
    Under FSDP2 the caller must make sure `lm_head.weight` is unsharded (its own
    `fully_shard` unit's `unshard()`), since the head module's forward is not called here.
    """
    head = _check_plain_head(model)
    impl = getattr(model.config, "_attn_implementation", None)
    context_parallel = "sftkit_cp" in batch.model_kwargs()
    if context_parallel and impl != "sftkit_packed":
        raise ValueError(
            "context-parallel shards need sftkit.model.attention.enable_packed_attention(model)"
        )
    if batch.cu_seqlens is not None and impl != "sftkit_packed" and "flash" not in str(impl):
        raise ValueError(
            f"packed rows with attn_implementation={impl!r} would attend across documents; "
            "call sftkit.model.attention.enable_packed_attention(model) first"
        )
    body = decoder_body(model)
    assert body is not None
    out = body(**batch.model_kwargs(), use_cache=False)
    hidden, targets = batch.hidden_and_targets(out.last_hidden_state)
    keep = targets != IGNORE_INDEX
    if isinstance(hidden, DTensor):
        return hidden[keep], head.weight, targets[keep]
    # The batch knows how many targets it has, so the kept positions are found without the
    # host sync of boolean indexing (which would stall the GPU queue mid-step): a stable sort
    # puts them first, in order.
    rows = torch.argsort((~keep).flatten().to(torch.uint8), stable=True)[: batch.num_target_tokens]
    return hidden.flatten(0, 1)[rows], head.weight, targets.flatten()[rows]
