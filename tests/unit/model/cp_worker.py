"""A 2-rank gloo worker for tests/unit/model/test_model_context_parallel_ranks.py.

Each rank builds the same tiny Llama (seeded), takes its context-parallel shard of one
batch, runs the chunked loss and backward, and all-reduces its gradients over the CP
group; rank 0 writes the loss, the gradients, the one-process reference and the bytes
saved for backward per rank (unique storages, `saved_tensors_hooks`) to a file.

    torchrun --nproc-per-node 2 cp_worker.py OUT.pt WIDTH
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def tiny_model(hidden: int, layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftkit.model.attention import enable_packed_attention

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, attention_dropout=0.0, use_cache=False,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    enable_packed_attention(model)
    return model


def loss_of(model: Any, batch: Any, tokens: int) -> torch.Tensor:
    from sftkit.train.loss import chunked_nll_sum, model_hidden_and_head

    hidden, weight, targets = model_hidden_and_head(model, batch)
    return chunked_nll_sum(hidden, weight, targets, 256) / tokens


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run `fn` recording every tensor autograd saves; bytes of the distinct storages."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def main() -> None:
    out_path, width = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from sftkit.batch import collate_packed
    from sftkit.model.context_parallel import shard_batch

    g = torch.Generator().manual_seed(1)
    lengths = [width // 4, width // 2, width // 4 - 3]  # three documents and a pad tail
    docs = [(torch.randint(1, 128, (n,), generator=g).tolist(), [1] * n) for n in lengths]
    batch = collate_packed(docs, [[0, 1, 2]], width, pad_id=0)
    model = tiny_model(hidden=32, layers=2)
    result: dict[str, Any] = {}
    if rank == 0:  # the one-process reference
        ref, ref_bytes = saved_bytes(lambda: loss_of(model, batch, batch.num_target_tokens))
        ref.backward()
        result["ref_loss"], result["ref_bytes"] = float(ref.detach()), ref_bytes
        result["ref_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    shard = shard_batch(batch, size, rank, dist.group.WORLD)
    loss, shard_bytes = saved_bytes(lambda: loss_of(model, shard, batch.num_target_tokens))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, param in model.named_parameters():
        dist.all_reduce(param.grad)
        grads[name] = param.grad
    all_bytes = [None] * size
    dist.all_gather_object(all_bytes, shard_bytes)
    if rank == 0:
        result.update(loss=float(total), grads=grads, bytes=all_bytes)
        torch.save(result, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
