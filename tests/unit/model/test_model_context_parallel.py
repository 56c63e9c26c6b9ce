"""Context-parallel maths on one process: the split, the shifted targets, and the attention
of local queries to global keys against dense masked attention on the full rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftkit.batch import IGNORE_INDEX, collate_packed, collate_padded
from sftkit.model.context_parallel import (
    _flex_attention,
    _runs_attention,
    gather_sequence,
    local_index,
    shard_batch,
)


def packed_batch() -> object:
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(1, 50, (n,), generator=g).tolist(), [1] * n) for n in (9, 14, 5)]
    return collate_packed(docs, [[0, 1, 2]], 30, pad_id=0)  # 28 tokens + a 2-token pad tail


def test_local_index_is_load_balanced() -> None:
    assert local_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([local_index(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))


@pytest.mark.parametrize("size", [2, 4])
def test_shards_cover_every_target_once(size: int) -> None:
    """Targets are shifted before the split: a chunk's last token predicts the next chunk's
    first, across ranks; together the shards hold each trained target exactly once."""
    batch = packed_batch()
    shards = [shard_batch(batch, size, r) for r in range(size)]
    width = shards[0].layout.global_docs.shape[1]
    assert width % (2 * size) == 0 and width >= 30
    full = torch.full((width,), IGNORE_INDEX)
    for shard in shards:
        full[shard.layout.global_index] = shard.targets[0]
        assert shard.input_ids.shape[1] == width // size
    expect = torch.full((width,), IGNORE_INDEX)
    expect[:29] = batch.labels[0, 1:]
    assert torch.equal(full, expect)
    assert sum(s.num_target_tokens for s in shards) == batch.num_target_tokens
    # position ids restart per document on every shard
    positions = torch.zeros(width, dtype=torch.long)
    for shard in shards:
        positions[shard.layout.global_index] = shard.position_ids[0]
    assert positions[:30].tolist() == batch.position_ids[0].tolist()


def dense_reference(q, k, v, docs):  # full rows: [rows, H, T, D]
    width = q.shape[2]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (docs[:, :, None] == docs[:, None, :]) & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


@pytest.mark.parametrize("kind", ["packed", "padded"])
@pytest.mark.parametrize("size", [2, 3])
def test_runs_attention_matches_dense_attention(kind: str, size: int) -> None:
    """Values and gradients of q, k, v equal dense document-causal attention."""
    if kind == "packed":
        batch = packed_batch()
    else:
        batch = collate_padded([([1] * 17, [1] * 17), ([2] * 9, [1] * 9)], 0, 1)
    shards = [shard_batch(batch, size, r) for r in range(size)]
    docs = shards[0].layout.global_docs
    rows, width = docs.shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, h, width, 8, generator=g) for h in (4, 2, 2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = dense_reference(q, k, v, docs)
    grad_out = torch.randn(ref.shape, generator=g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    parts = []
    for shard in shards:
        idx = shard.layout.global_index
        parts.append((k[:, :, idx], v[:, :, idx]))
    k_parts, v_parts = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    outs = []
    for shard in shards:
        idx = shard.layout.global_index
        keys = gather_sequence(k_parts[0], shard.layout, k_parts)
        values = gather_sequence(v_parts[0], shard.layout, v_parts)
        out = _runs_attention(q[:, :, idx], keys, values, shard.layout, None)
        torch.testing.assert_close(out.transpose(1, 2), ref[:, :, idx], rtol=1e-5, atol=1e-5)
        outs.append((out, idx))
    total = sum((o * grad_out[:, :, i].transpose(1, 2)).sum() for o, i in outs)
    grads = torch.autograd.grad(total, (q, k, v))
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # imports torch._dynamo: ~10 s on 2 cores
@torch.no_grad()
def test_flex_mask_matches_dense_attention() -> None:
    """The CUDA backend's block mask, run forward on CPU (flex has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = packed_batch()
    shards = [shard_batch(batch, 2, r) for r in range(2)]
    docs = shards[0].layout.global_docs
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, docs.shape[1], 8, generator=g) for h in (4, 2, 2))
    ref = dense_reference(q, k, v, docs)
    for shard in shards:
        idx = shard.layout.global_index
        out = _flex_attention(q[:, :, idx], k, v, shard.layout, None)
        torch.testing.assert_close(out.transpose(1, 2), ref[:, :, idx], rtol=1e-5, atol=1e-5)
