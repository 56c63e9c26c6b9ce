"""Context parallelism: one sequence split over C ranks, attention over all-gathered K/V.

Each row of a micro-batch is cut into 2C chunks of L tokens; CP rank r keeps chunks r and
2C-1-r (causal load balancing: an early chunk with few keys and a late one with many, so
every rank does the same attention work). Everything token-wise (embeddings, norms, MLP,
projections, RoPE from each token's own position id, the chunked loss) runs on the local
2L tokens only; each attention layer all-gathers K and V over the CP group (gradients
reduce-scattered back in backward) and attends its local queries to the global keys with
the causal, document-isolating mask of their global positions.

Labels are shifted on the whole row before the split (`ContextShard.targets`): the target of
a chunk's last token is the next chunk's first token, which lives on another rank. The
loss of a shard is its share of the row's loss; summed over the CP group (FSDP's gradient
reduction runs over data x context ranks, `ParallelDims.fsdp_mesh`) it is the row's loss.

Attention backends: on CPU each run of local queries of one document (at most two per
document and rank) attends to its document's keys in two blocks, the keys before the run
(all visible) and the run's own span (causal), merged by their log-sum-exp with torch's
CPU flash kernel, forward and backward (no [queries, keys] mask is ever built). On CUDA,
flex attention with a block mask of global positions and documents.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sftkit.batch import IGNORE_INDEX, PackedBatch, round_up
from sftkit.dist import DistEnv
from sftkit.model.flex import flex, flex_api


@dataclass
class ContextLayout:
    """Where this rank's tokens sit in the full rows, for the attention layers."""

    group: Any  # the CP process group (None: a single-process test of the maths)
    size: int  # C
    rank: int  # this rank's index in the CP group
    chunk: int  # L: tokens per chunk (a row is 2C chunks)
    runs: list[list[tuple[int, int, int, int]]]  # per row: (q_lo, q_hi, k_lo, g_lo), see below
    global_index: Tensor  # [2L]: position of each local token in the full row
    local_docs: Tensor  # [rows, 2L] document id of each local token
    global_docs: Tensor  # [rows, 2C L] document id of each token of the full rows
    cache: dict[str, Any] = field(default_factory=dict)  # per-device block masks

    # A run is local queries [q_lo, q_hi) of one document, contiguous in the full row from
    # global position g_lo; they see keys [k_lo, g_lo + q_hi - q_lo) (k_lo: document start).


@dataclass
class ContextShard(PackedBatch):
    """One rank's share of a micro-batch under context parallelism (`shard_batch`)."""

    targets: Tensor | None = None  # [rows, 2L] target of each local token, shifted on full rows
    layout: ContextLayout | None = None

    def model_kwargs(self) -> dict[str, object]:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "sftkit_cp": self.layout,
        }

    def hidden_and_targets(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        assert self.targets is not None
        return hidden, self.targets


def _documents(batch: PackedBatch, rows: int, width: int) -> Tensor:
    """Document id of every token, [rows, width]; a padded row is one document."""
    if batch.cu_seqlens is None:
        return torch.arange(rows)[:, None].expand(rows, width).clone()
    flat = torch.arange(rows * width, dtype=torch.int64)
    bounds = batch.cu_seqlens.to(torch.int64).cpu()
    return torch.searchsorted(bounds[1:].contiguous(), flat, right=True).view(rows, width)


def _pad_to(batch: PackedBatch, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """input ids, targets (shifted), positions and documents padded on the right to `width`.

    The pad tail is a document of its own in packed rows (positions restart) and continues
    the row in padded ones (it only follows real tokens, as `collate_padded`'s pads do).
    """
    rows, old = batch.input_ids.shape
    docs = _documents(batch, rows, old)
    targets = torch.full((rows, old), IGNORE_INDEX, dtype=torch.long)
    targets[:, :-1] = batch.labels[:, 1:].cpu()
    extra = width - old
    if extra == 0:
        return batch.input_ids.cpu(), targets, batch.position_ids.cpu(), docs
    ids = torch.cat([batch.input_ids.cpu(), batch.input_ids[:, -1:].cpu().expand(rows, extra)], 1)
    targets = torch.cat([targets, torch.full((rows, extra), IGNORE_INDEX)], 1)
    if batch.cu_seqlens is None:
        tail_pos = torch.arange(old, width).expand(rows, extra)
        tail_docs = docs[:, -1:].expand(rows, extra)
    else:
        tail_pos = torch.arange(extra).expand(rows, extra)
        tail_docs = (int(docs.max()) + 1 + torch.arange(rows))[:, None].expand(rows, extra)
    positions = torch.cat([batch.position_ids.cpu(), tail_pos], 1)
    return ids, targets, positions, torch.cat([docs, tail_docs], 1)


def local_index(width: int, size: int, rank: int) -> Tensor:
    """Positions in a row of `width` tokens that CP rank `rank` of `size` keeps."""
    chunk = width // (2 * size)
    early = torch.arange(rank * chunk, (rank + 1) * chunk)
    late = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk)
    return torch.cat([early, late])


def shard_batch(
    batch: PackedBatch, size: int, rank: int, group: Any = None, divisor: int | None = None
) -> ContextShard:
    """This rank's two chunks of every row of `batch`, rows padded to a multiple of
    `divisor` (`ParallelDims.seq_len_divisor`; default 2 x `size`)."""
    rows, width = batch.input_ids.shape
    width = round_up(width, divisor or 2 * size)
    ids, targets, positions, docs = _pad_to(batch, width)
    index = local_index(width, size, rank)
    start = torch.arange(width).expand(rows, width)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    doc_start = torch.where(first, start, torch.zeros_like(start)).cummax(dim=1).values
    local_docs, local_start = docs[:, index], doc_start[:, index]
    chunk = width // (2 * size)
    runs = []
    for r in range(rows):
        cut = torch.ones(2 * chunk, dtype=torch.bool)
        cut[1:] = local_docs[r, 1:] != local_docs[r, :-1]
        cut[chunk] = True  # the two chunks are not contiguous in the row
        lows = cut.nonzero().flatten().tolist()
        highs = [*lows[1:], 2 * chunk]
        runs.append(
            [
                (lo, hi, int(local_start[r, lo]), int(index[lo]))
                for lo, hi in zip(lows, highs, strict=True)
            ]
        )
    local_targets = targets[:, index]
    layout = ContextLayout(group, size, rank, chunk, runs, index, local_docs, docs)
    return ContextShard(
        input_ids=ids[:, index],
        labels=local_targets,
        position_ids=positions[:, index],
        cu_seqlens=None,
        max_seqlen=width,
        num_target_tokens=int((local_targets != IGNORE_INDEX).sum()),
        targets=local_targets,
        layout=layout,
    )


def shard_batches(batches: list[PackedBatch], env: DistEnv) -> list[PackedBatch]:
    """Each micro-batch's context-parallel share for this rank (unchanged without CP)."""
    dims = env.dims
    if dims.cp <= 1:
        return batches
    cp_rank, group = dims.coordinates(env.rank).cp, env.group("cp")
    return [shard_batch(b, dims.cp, cp_rank, group, dims.seq_len_divisor) for b in batches]


# ----------------------------------------------------------------------------- K/V gather


class _AllGather(torch.autograd.Function):
    """Stack of every CP rank's tensor; backward sums the gradients back to their owners
    (reduce-scatter on NCCL; all-reduce and keep one's own block on gloo, which lacks it)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad.flatten(0, 1), group=group)
            return out, None
        dist.all_reduce(grad, group=group)
        return grad[dist.get_rank(group)].clone(), None


def gather_sequence(local: Tensor, layout: ContextLayout, parts: Tensor | None = None) -> Tensor:
    """[rows, heads, 2L, D] local -> [rows, heads, 2C L, D] in row order, from all CP ranks.

    `parts` ([C, rows, heads, 2L, D]) replaces the collective (tests of the maths)."""
    if parts is None:
        parts = _AllGather.apply(local, layout.group)
    assert parts is not None
    size, chunk = layout.size, layout.chunk
    chunks = []
    for j in range(2 * size):
        owner, half = (j, 0) if j < size else (2 * size - 1 - j, 1)
        chunks.append(parts[owner][:, :, half * chunk : (half + 1) * chunk])
    return torch.cat(chunks, dim=2)


# ----------------------------------------------------------------------------- CPU blocks


class _PrefixCausalAttention(torch.autograd.Function):
    """softmax over [prefix keys (all visible), own keys (causal)] for one run of queries.

    Each block is one flash-attention call returning its log-sum-exp; outputs merge by
    their LSE, and each block's backward takes the merged output and LSE (as ring
    attention's does), so gradients are exact without any [queries, keys] mask.
    """

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, kp: Tensor, vp: Tensor, kd: Tensor, vd: Tensor, scale: float | None
    ) -> Tensor:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        q, kp, vp, kd, vd = (t.contiguous() for t in (q, kp, vp, kd, vd))
        out_p, lse_p = flash(q, kp, vp, 0.0, False, scale=scale)
        out_d, lse_d = flash(q, kd, vd, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_p, lse_d)
        out = (
            out_p.float() * torch.exp(lse_p - lse)[..., None]
            + out_d.float() * torch.exp(lse_d - lse)[..., None]
        ).to(q.dtype)
        ctx.save_for_backward(q, kp, vp, kd, vd, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, kp, vp, kd, vd, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq_p, dkp, dvp = backward(grad, q, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dq_d, dkd, dvd = backward(grad, q, kd, vd, out, lse, 0.0, True, scale=ctx.scale)
        return dq_p + dq_d, dkp, dvp, dkd, dvd, None


@functools.cache
def _cpu_flash_gqa() -> bool:
    """Whether this torch's CPU flash kernel takes fewer K/V heads than query heads, forward
    and backward (torch 2.15 does); checked once on a tiny case against repeated heads."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 4, 8, generator=g) for h in (2, 1, 1))
    k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    try:
        out, lse = flash(q, k, v, 0.0, False)
        dq, dk, dv = backward(torch.ones_like(out), q, k, v, out, lse, 0.0, False)
    except RuntimeError:
        return False
    ref, ref_lse = flash(q, k2, v2, 0.0, False)
    _, rdk, _ = backward(torch.ones_like(ref), q, k2, v2, ref, ref_lse, 0.0, False)
    return (
        dk.shape == k.shape
        and torch.allclose(out, ref)
        and torch.allclose(dk, rdk.view(1, 1, 2, 4, 8).sum(2), atol=1e-5)
    )


def _runs_attention(
    query: Tensor, keys: Tensor, values: Tensor, layout: ContextLayout, scale: float | None
) -> Tensor:
    """Per-run attention of local queries [rows, H, 2L, D] to global K/V; [rows, 2L, H, D]."""
    import torch.nn.functional as F

    groups = query.shape[1] // keys.shape[1]
    if groups > 1 and not _cpu_flash_gqa():  # then repeat the K/V heads (more memory)
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    gqa = keys.shape[1] != query.shape[1]
    rows_out = []
    for row, runs in enumerate(layout.runs):
        outs = []
        for q_lo, q_hi, k_lo, g_lo in runs:
            q = query[row : row + 1, :, q_lo:q_hi]
            g_hi = g_lo + q_hi - q_lo
            kd, vd = keys[row : row + 1, :, g_lo:g_hi], values[row : row + 1, :, g_lo:g_hi]
            if k_lo == g_lo:
                outs.append(
                    F.scaled_dot_product_attention(
                        q, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa
                    )
                )
                continue
            kp, vp = keys[row : row + 1, :, k_lo:g_lo], values[row : row + 1, :, k_lo:g_lo]
            outs.append(_PrefixCausalAttention.apply(q, kp, vp, kd, vd, scale))
        rows_out.append(torch.cat(outs, dim=2))
    return torch.cat(rows_out, dim=0).transpose(1, 2)


# ----------------------------------------------------------------------------- CUDA flex


def _flex_attention(
    query: Tensor, keys: Tensor, values: Tensor, layout: ContextLayout, scale: float | None
) -> Tensor:
    """Flex attention with a block mask of global positions and documents; [rows, 2L, H, D]."""
    api = flex_api()
    if api is None:
        raise ValueError("context parallelism on CUDA needs torch's flex_attention (torch>=2.5)")
    rows, _, width_q, _ = query.shape
    width_k = keys.shape[2]
    key = f"flex:{query.device}"
    if key not in layout.cache:
        device = query.device
        gq = layout.global_index.to(device)
        dq, dk = layout.local_docs.to(device), layout.global_docs.to(device)

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (dq[b, q] == dk[b, kv]) & (gq[q] >= kv)

        layout.cache[key] = api[0](mask_mod, rows, None, width_q, width_k, device=device)
    gqa = keys.shape[1] != query.shape[1]
    out = flex(query, keys, values, block_mask=layout.cache[key], scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def context_parallel_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: ContextLayout,
    scale: float | None,
    parts: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Local queries [rows, H, 2L, D] against K/V gathered over the CP group; [rows, 2L, H, D].

    `parts` gives the gathered K and V stacks directly (tests of the maths, one process)."""
    keys = gather_sequence(key, layout, None if parts is None else parts[0])
    values = gather_sequence(value, layout, None if parts is None else parts[1])
    if query.device.type == "cuda":
        return _flex_attention(query, keys, values, layout, scale)
    return _runs_attention(query, keys, values, layout, scale)
