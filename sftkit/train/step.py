"""One optimizer step and one validation pass, with NeMo RL's token-level loss.

loss = (sum of token NLL over every trained token of the global batch)
       / (number of trained tokens in the global batch, over all micro-batches and ranks)

The denominator is known before any forward pass, so each micro-batch contributes its
exact share and neither gradient accumulation nor the number of ranks changes the loss or
the gradient. An MoE model's router balancing loss (`sftkit.train.moe`) adds
`coef * aux(micro-batch) * targets(micro-batch) / global targets` per micro-batch: one
micro-batch on one rank is HF's `loss + coef * aux_loss`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from sftkit.batch import IGNORE_INDEX, PackedBatch
from sftkit.dist import DistEnv, clip_grad_norm
from sftkit.errors import NonFiniteError
from sftkit.train.loss import chunked_loss_blocker, chunked_nll_sum, model_hidden_and_head
from sftkit.train.moe import RouterLoss, load_metrics

logger = logging.getLogger("sftkit")


@dataclass
class StepOptions:
    """What a step needs to know besides the model and data."""

    compute_dtype: torch.dtype
    max_grad_norm: float | None
    chunked_loss: bool
    chunk_size: int
    grad_scale: float = 1.0  # undoes gradient averaging by a data-parallel wrapper
    fused_ce: bool | None = None  # Triton loss kernel for the chunked head (None: on CUDA)
    router: RouterLoss | None = None  # an MoE family's balancing loss (`train.moe`)


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
    logits, targets = batch.hidden_and_targets(
        model(**batch.model_kwargs(), use_cache=False).logits
    )
    logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
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
    # Summed on the device: the host reads the loss once per step, not once per micro-batch.
    local_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    local_aux = torch.zeros((), dtype=torch.float64, device=env.device)
    denominator = max(global_tokens, 1)
    router = opts.router
    # [layers, experts] real tokens routed to each expert, summed over micro-batches (MoE).
    load = torch.zeros(router.load_shape if router else (0, 0), device=env.device)
    for batch in batches:
        batch = batch.to(env.device)
        recording: contextlib.AbstractContextManager[list[torch.Tensor]] = (
            router.record() if router is not None else contextlib.nullcontext([])
        )
        with recording as routed, autocast(env.device, opts.compute_dtype):
            nll = micro_batch_nll(model, batch, opts)
        objective = nll * (opts.grad_scale / denominator)
        if router is not None and batch.real_tokens is not None:
            share = batch.num_target_tokens / denominator  # 0 for a dummy micro-batch
            aux, routed_load = router.aux_and_load(routed, batch.real_tokens)
            if router.in_loss:
                objective = objective + aux * (router.coef * share * opts.grad_scale)
            local_aux += share * aux.detach().double()
            if batch.num_target_tokens:  # not a dummy micro-batch
                load += routed_load
        objective.backward()
        local_loss += nll.detach().double() / denominator
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = opts.max_grad_norm if opts.max_grad_norm else math.inf
    try:
        if device_side_update(optimizer, env):
            loss, grad_norm = _clip_and_update_on_device(
                optimizer, params, local_loss, max_norm, global_tokens > 0
            )
        else:
            loss = env.sum(float(local_loss))
            grad_norm = float(clip_grad_norm(params, max_norm))
            if math.isfinite(loss) and math.isfinite(grad_norm) and global_tokens > 0:
                optimizer.step()
    except RuntimeError as err:  # e.g. lr=1e38: lr / (1 - beta1) no longer fits a float
        if "overflow" not in str(err):
            raise
        raise NonFiniteError(
            f"the optimizer update at step {step} overflowed ({err}); the last checkpoint is "
            "untouched. Lower policy.optimizer.kwargs.lr (or weight_decay)."
        ) from err
    optimizer.zero_grad(set_to_none=True)
    metrics = {"loss": loss, "grad_norm": grad_norm}
    if router is not None:  # train/loss stays the NLL; the router's term is logged beside it
        metrics["train/aux_loss"] = env.sum(float(local_aux))
        metrics.update(load_metrics(env.sum_tensor(load)))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
            f"on rank {env.rank} (loss={loss}, grad_norm={grad_norm}); the update was not "
            "applied and the last checkpoint is untouched. Lower the learning rate, check the "
            "data at this step, or use policy.precision=float32."
        )
    return metrics


def device_side_update(optimizer: torch.optim.Optimizer, env: DistEnv) -> bool:
    """Whether clipping and the skip of a non-finite update can stay on the device.

    torch's fused Adam, AdamW and SGD take a gradient divisor and a skip flag as device
    tensors (`grad_scale`, `found_inf`: how `torch.amp.GradScaler` drives them), so the host
    need not read the gradient norm before the update. Plain tensors only: FSDP2/TP
    parameters (DTensors) and multi-process runs take the host-checked path.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False) or env.initialized:
        return False
    return not any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])


def _clip_and_update_on_device(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    loss: torch.Tensor,
    max_norm: float,
    update: bool,
) -> tuple[float, float]:
    """Clip inside the fused update and skip it on the device when the loss or gradient is
    not finite; the host waits for the gradient norm only, not for the update.

    Clipping divides by `max(norm / max_norm, 1)` inside the optimizer kernel instead of a
    separate pass over every gradient (torch's clip multiplies by its inverse: equal up to
    float rounding).
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = (
        torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros((), dtype=torch.float32)
    )
    skip = ~(torch.isfinite(norm) & torch.isfinite(loss))
    stats = torch.stack([loss, norm.double()])
    cuda = stats.device.type == "cuda"
    if cuda:  # into pinned memory, read once the norm is ready: the update keeps the GPU busy
        stats = stats.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    if update:
        clip = (norm.float() + 1e-6) / max_norm
        # The fused kernels read both as float32.
        divisor = None if math.isinf(max_norm) else torch.clamp(clip, min=1.0)
        optimizer.grad_scale = divisor  # type: ignore[attr-defined]
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    if cuda:
        ready.synchronize()
    loss_value, norm_value = stats.tolist()
    return loss_value, norm_value


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
