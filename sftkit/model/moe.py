"""MoE experts: the grouped compute and expert parallelism (EP) over transformers' fused
3-D expert parameters.

transformers (>= 5) stores a family's experts as one module with `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I] (`is_transposed`: [E, H, 2I] and [E, I, H], with
biases for gpt-oss), marked by `@use_experts_implementation`, whose forward takes
(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]). Without EP sftkit keeps
transformers' own implementation (its `grouped_mm` by default): under FSDP2 the forward
sees whole all-gathered weights, so it composes.

With EP (`apply_expert_parallel`) each rank of an "ep" group holds E / ep experts (a
DTensor `Shard(0)` over "ep", which FSDP2 then shards over "efsdp"), and the module's
forward becomes `ep_experts_forward`: the (token, choice) pairs are sorted by expert
(argsort), sent to the rank owning the expert with one variable-split all-to-all,
regrouped by local expert, run through `grouped_experts`, sent back with the inverse
all-to-all and weighted and summed per token (`index_add`). No token is dropped (no
capacity factor), so the result is one process's up to float summation order. The
routing weights are applied on the token's own rank, so the router's gradient stays local.

Gradients: an expert's gradient on its rank already sums the tokens of the whole "ep"
group (the all-to-all's backward brings them), so it is divided by ep here and FSDP2's
average over "efsdp" (x "dp_replicate") finishes the division by every data-parallel rank,
as the dense weights' average over all of them does. (FSDP2's own
`set_gradient_divide_factor` is not used: it needs NCCL's PREMUL_SUM, which gloo lacks, and
with `set_force_sum_reduction_for_comms` torch 2.15 divides twice on a one-rank mesh.)
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger("sftkit")

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "up_proj")
EXPERT_BIASES = ("gate_up_proj_bias", "down_proj_bias", "up_proj_bias")


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """transformers' fused experts modules (`@use_experts_implementation` sets `has_gate`)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if hasattr(m, "has_gate") and hasattr(m, "down_proj") and hasattr(m, "num_experts")
    ]


# ----------------------------------------------------------------------------- compute


def _grouped_mm_fits(x: Tensor, w: Tensor) -> bool:
    """Whether torch's grouped GEMM runs on these operands: CUDA needs SM80+ (and bf16
    under compile, which sftkit does not trace here); the CPU kernel needs 16-byte aligned
    rows ("strides should be multiple of 16 bytes" otherwise, e.g. a width of 6 floats)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu":
        return False
    size = x.element_size()
    dims = (x.shape[-1], w.shape[-1], w.shape[-2])
    return all(d * size % 16 == 0 for d in dims) and x.data_ptr() % 16 == w.data_ptr() % 16 == 0


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor, offsets: Tensor) -> Tensor:
    """x [S, in] sorted by group, w [G, in, out], `counts` [G] rows per group (on the host
    for the fallback), `offsets` their int32 cumsum: [S, out]. torch's grouped GEMM where
    it runs, else one matmul per group (a loop over experts, never over tokens)."""
    if x.shape[0] and _grouped_mm_fits(x, w):
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        return fn(x, w, offs=offsets)
    pieces = torch.split(x, counts.tolist())
    return torch.cat([p @ w[g] for g, p in enumerate(pieces)]) if pieces else x @ w[0]


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t  # DTensor (EP/FSDP2) -> this rank's block


def grouped_experts(module: Any, x: Tensor, experts: Tensor, counts: Tensor) -> Tensor:
    """The experts' MLP on rows `x` [S, H] sorted by local expert id `experts` [S] with
    `counts` [E_local] rows each: transformers' maths (gate/activation from the module),
    on this rank's block of the weights, read through the module's attributes each call so
    a parametrization on them (LoRA's delta) applies."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32).to(x.device)
    transposed = bool(module.is_transposed)
    scale = float(getattr(module, "_sftkit_grad_scale", 1.0))

    def weight(name: str) -> Tensor:
        w = _local(getattr(module, name))
        return _ScaleGrad.apply(w, scale) if scale != 1.0 else w

    def linear(h: Tensor, name: str) -> Tensor:
        w = weight(name)
        out = grouped_mm(h.to(w.dtype), w if transposed else w.transpose(-2, -1), counts, offsets)
        if module.has_bias:
            out = out + weight(f"{name}_bias")[experts]
        return out

    if module.has_gate:
        h = module._apply_gate(linear(x, "gate_up_proj"))
    else:
        h = module.act_fn(linear(x, "up_proj"))
    out = linear(h, "down_proj")
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out


def local_experts_forward(
    module: Any, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """transformers' experts forward through `grouped_experts` on one rank (all experts
    local): the token permutation and its inverse as argsort, gather and index_add."""
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=int(module.num_experts)).cpu()
    out = grouped_experts(module, hidden[order // top_k], flat[order], counts)
    return _combine(out, order, top_k_weights, top_k, hidden)


def _combine(out: Tensor, order: Tensor, weights: Tensor, top_k: int, hidden: Tensor) -> Tensor:
    """Weight each (token, choice) row and sum it into its token: [T, H] in hidden's dtype."""
    out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    total = torch.zeros(hidden.shape[0], out.shape[-1], dtype=out.dtype, device=out.device)
    return total.index_add(0, order // top_k, out).to(hidden.dtype)


# ----------------------------------------------------------------------------- expert parallel


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (EP's 1 / ep, module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class _AllToAll(torch.autograd.Function):
    """A variable-split all-to-all whose backward is the inverse exchange (gloo and NCCL)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Rows `x` cut by `in_splits` go to each rank of `group`; returns what arrives."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def ep_experts_forward(
    module: Any, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts forward under EP (module doc): dispatch, local grouped compute, combine."""
    group, ep = module._sftkit_ep_group, module._sftkit_ep
    n_experts, top_k = int(module.num_experts), top_k_index.shape[-1]
    n_local = n_experts // ep
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(flat, minlength=n_experts)
    # How many rows each rank sends to each of this rank's experts: [ep, E_local].
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    send = counts.view(ep, n_local).sum(1).tolist()
    received = received.view(ep, n_local).cpu()
    recv = received.sum(1).tolist()  # the one host sync, as any variable all-to-all needs
    rows = all_to_all(hidden[order // top_k], recv, send, group)
    # Rows arrive grouped by (source rank, local expert); regroup them by local expert.
    local_ids = torch.arange(n_local).repeat(ep).repeat_interleave(received.reshape(-1))
    local_ids = local_ids.to(rows.device)
    regroup = torch.argsort(local_ids, stable=True)
    out = grouped_experts(module, rows[regroup], local_ids[regroup], received.sum(0))
    back = torch.empty_like(regroup)
    back[regroup] = torch.arange(regroup.numel(), device=regroup.device)
    out = all_to_all(out[back], send, recv, group)
    return _combine(out, order, top_k_weights, top_k, hidden)


def apply_expert_parallel(model: nn.Module, ep_mesh: Any) -> int:
    """Shard every experts module's weights over `ep_mesh` (`Shard(0)`: E / ep experts a
    rank, on the meta device before FSDP2) and route its forward through the all-to-all.
    Returns how many modules it sharded (0: a dense model, nothing to shard)."""
    from torch.distributed.tensor import DTensor, Shard

    ep = ep_mesh.size()
    modules = expert_modules(model)
    for name, module in modules:
        n_experts = int(cast(Any, module).num_experts)
        if n_experts % ep:
            raise ValueError(
                f"policy.dtensor_cfg.expert_parallel_size={ep} does not divide {name}'s "
                f"{n_experts} experts; set it to a divisor of {n_experts}"
            )
        # The weights, and LoRA's per-expert A and B (`sftkit.model.lora_experts`), which
        # have the experts on dim 0 too: W + s B@A is then formed on this rank's experts.
        holders = [
            module,
            *(getattr(module, n) for n in ("lora_A", "lora_B") if hasattr(module, n)),
        ]
        for holder in holders:
            for pname, param in list(holder.named_parameters(recurse=False)):
                if holder is module and pname not in (*EXPERT_WEIGHTS, *EXPERT_BIASES):
                    continue
                block = param.chunk(ep, dim=0)[ep_mesh.get_local_rank()]
                dt = DTensor.from_local(block, ep_mesh, [Shard(0)], run_check=False,
                                        shape=param.shape, stride=param.stride())  # fmt: skip
                setattr(holder, pname, nn.Parameter(dt, requires_grad=param.requires_grad))
        module._sftkit_ep, module._sftkit_ep_group = ep, ep_mesh.get_group()
        module._sftkit_grad_scale = 1.0 / ep
        module.forward = types.MethodType(ep_experts_forward, module)
    return len(modules)


# ----------------------------------------------------------------------------- loading


Reader = Callable[[tuple[slice, ...]], Tensor]


def per_expert_reader(model: nn.Module, name: str, where: dict[str, Any]) -> Reader | None:
    """How to read a block of fused expert parameter `name` from safetensors that store one
    matrix per expert (Qwen3-MoE's `experts.{e}.gate_proj.weight`, Mixtral's `w1`/`w3`):
    transformers' own conversion mapping for the family says which keys and how they join
    (`MergeModulelist(dim=0)` stacks experts, `Concatenate(dim=1)` joins gate and up). The
    reader loads only the experts of the block. None when the files hold no such keys."""
    found = _per_expert_sources(model, name)
    if found is None:
        return None
    stem, sources, renames = found

    def key(pattern: str, expert: int) -> str | None:
        return _spelled(stem + pattern.replace("*", str(expert)), renames, where)

    if key(sources[0], 0) is None:
        return None

    def read(index: tuple[slice, ...]) -> Tensor:
        blocks = []
        for expert in range(index[0].start, index[0].stop):
            keys = [key(pattern, expert) for pattern in sources]
            if None in keys:
                raise ValueError(f"the weight files lack {stem}{sources} for expert {expert}")
            parts = [where[k].get_tensor(k) for k in keys if k is not None]
            blocks.append(torch.cat(parts, dim=0)[index[1:]])
        return torch.stack(blocks)

    return read


_JOINS = ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def _spelled(name: str, renames: list[tuple[str, str]], where: dict[str, Any]) -> str | None:
    """`name` as the files spell it: itself, or with one of the family's renamings undone."""
    for new, old in [(name, name), *renames]:
        candidate = name.replace(new, old)
        if candidate in where:
            return candidate
    return None


def file_key(model: nn.Module, name: str, where: dict[str, Any]) -> str | None:
    """The key of parameter `name` in weight files that keep the family's original names
    (transformers renames on load, e.g. Nemotron-H's `backbone.` -> `model.`)."""
    return _spelled(name, _renamings(model), where)


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return [
        (t.target_patterns[0], source)
        for t in get_checkpoint_conversion_mapping(model_type) or []
        if not getattr(t, "operations", None)
        for source in t.source_patterns
    ]


def _per_expert_sources(
    model: nn.Module, name: str
) -> tuple[str, list[str], list[tuple[str, str]]] | None:
    """(the name's prefix, the per-expert key patterns joined into it, the family's
    renamings new -> old) from transformers' conversion mapping; None if none applies."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renames = _renamings(model)
    for transform in transforms:
        ops = [
            (type(o).__name__, getattr(o, "dim", None))
            for o in getattr(transform, "operations", [])
        ]
        target = transform.target_patterns[0]
        if ops in _JOINS and name.endswith(target):
            return name[: len(name) - len(target)], list(transform.source_patterns), renames
    return None
