"""One optimizer step and one validation pass, with NeMo RL's token-level loss.

loss = (sum of token NLL over every trained token of the global batch)
       / (number of trained tokens in the global batch, over all micro-batches and ranks)

The denominator is known before any forward pass, so each micro-batch contributes its
exact share and neither gradient accumulation nor the number of ranks changes the loss or
the gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sftkit.data.packing import IGNORE_INDEX, PackedBatch
from sftkit.train.dist import DistEnv, clip_grad_norm
from sftkit.train.loss import chunked_loss_blocker, chunked_nll_sum, model_hidden_and_head

logger = logging.getLogger("sftkit")


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; raised before the optimizer could apply it."""


@dataclass
class StepOptions:
    """What a step needs to know besides the model and data."""

    compute_dtype: torch.dtype
    max_grad_norm: float | None
    chunked_loss: bool
    chunk_size: int
    grad_scale: float = 1.0  # undoes gradient averaging by a data-parallel wrapper
    fused_ce: bool | None = None  # Triton loss kernel for the chunked head (None: on CUDA)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision over float32 master weights; nothing to do for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def micro_batch_nll(model: nn.Module, batch: PackedBatch, opts: StepOptions) -> torch.Tensor:
    """Sum of NLL over the trained targets of one micro-batch (float32 scalar)."""
    if opts.chunked_loss:
        hidden, weight, targets = model_hidden_and_head(model, batch)
        return chunked_nll_sum(hidden, weight, targets, opts.chunk_size, fused_ce=opts.fused_ce)
    logits = model(**batch.model_kwargs(), use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the chunked head reproduces the model's own logits (see `chunked_loss_blocker`);
    models that transform their logits (softcapping, muP scaling) use the plain loss."""
    reason = chunked_loss_blocker(model)
    if reason is not None:
        logger.info("Chunked loss off: %s; computing full logits instead", reason)
    return reason is None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[PackedBatch],
    global_tokens: int,
    opts: StepOptions,
    env: DistEnv,
    step: int,
) -> dict[str, float]:
    """Forward/backward over this rank's micro-batches, clip, check finiteness, update."""
    model.train()
    # Summed on the device: one host sync per step, not one per micro-batch.
    local_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    denominator = max(global_tokens, 1)
    for batch in batches:
        batch = batch.to(env.device)
        with autocast(env.device, opts.compute_dtype):
            nll = micro_batch_nll(model, batch, opts)
        (nll * (opts.grad_scale / denominator)).backward()
        local_loss += nll.detach().double() / denominator
    loss = env.sum(float(local_loss))
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = opts.max_grad_norm if opts.max_grad_norm else math.inf
    grad_norm = float(clip_grad_norm(params, max_norm))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
            f"on rank {env.rank} (loss={loss}, grad_norm={grad_norm}); the update was not "
            "applied and the last checkpoint is untouched. Lower the learning rate, check the "
            "data at this step, or use policy.precision=float32."
        )
    if global_tokens > 0:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm}


@torch.no_grad()
def validation_loss(
    model: nn.Module, batches: list[PackedBatch], opts: StepOptions, env: DistEnv
) -> tuple[float, int]:
    """Token-weighted mean NLL over `batches` (all ranks), and the token count."""
    model.eval()
    nll_sum = 0.0
    tokens = 0
    for batch in batches:
        batch = batch.to(env.device)
        with autocast(env.device, opts.compute_dtype):
            nll_sum += float(micro_batch_nll(model, batch, opts))
        tokens += batch.num_target_tokens
    nll_sum, tokens = env.sum(nll_sum), int(env.sum(tokens))
    return (nll_sum / tokens if tokens else float("nan")), tokens
