"""A 2-rank gloo worker for test_train_moe.py: an MoE step across ranks against the weighting.

Each rank builds the same tiny Mixtral (seeded, router loss on), takes every other example
of one global batch in micro-batches of 2, and runs `train_step` (no FSDP: the gradients
are summed over ranks here, as FSDP's reduce-scatter times `grad_scale` does). Rank 0 also
runs HF's forward on every rank's micro-batches, each weighted by its share of the global
targets (`test_train_moe.hf_reference`), and writes both to a file.

    torchrun --nproc-per-node 2 moe_worker.py OUT.pt
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    from test_train_moe import Capture, examples, hf_reference, tiny_moe

    from sftkit.data.loader import BatchPlan, micro_batches
    from sftkit.dist import init_distributed
    from sftkit.train.moe import router_loss_for
    from sftkit.train.step import StepOptions, train_step

    env = init_distributed("cpu")
    torch.set_num_threads(1)
    data = examples(9, seed=3)
    plan = BatchPlan(micro_batch_size=2)
    per_rank = [micro_batches(data[r :: env.world_size], plan) for r in range(env.world_size)]
    mine = per_rank[env.rank]
    global_tokens = int(env.sum(sum(b.num_target_tokens for b in mine)))
    model = tiny_moe("mixtral")
    opts = StepOptions(torch.float32, None, chunked_loss=True, chunk_size=7,
                       router=router_loss_for(model, env))  # fmt: skip
    optimizer = Capture(list(model.parameters()))
    result = train_step(model, optimizer, mine, global_tokens, opts, env, step=1)
    grads = optimizer.grads
    for grad in grads:
        dist.all_reduce(grad)
    if env.rank == 0:
        everything = [b for batches in per_rank for b in batches]
        nll, aux, ref_grads = hf_reference(model, everything, on=True)
        torch.save({"result": result, "grads": grads, "nll": nll, "aux": aux,
                    "ref_grads": ref_grads}, sys.argv[1])  # fmt: skip
    # Leave together: rank 1 tearing down gloo while rank 0 still computes the reference
    # aborted it once in CI ("terminate called without an active exception", SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
