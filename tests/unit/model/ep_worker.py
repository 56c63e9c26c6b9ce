"""Worker of test_model_moe.py's EP test, started on 2 gloo ranks by torch.distributed.run:
each rank routes its own tokens through half the experts of a family's MoE block and
checks outputs and gradients against the whole block on the whole batch in one process."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(__file__))
from test_model_moe import FAMILIES, moe_block  # noqa: E402

from sftkit.model.moe import apply_expert_parallel  # noqa: E402


def check(family: str, rank: int, mesh: object) -> None:
    block = moe_block(family)
    ref = copy.deepcopy(block)
    g = torch.Generator().manual_seed(1)
    x, grad_out = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    assert apply_expert_parallel(block, mesh) == 1
    mine = x[rank : rank + 1].clone().requires_grad_()
    out = block(mine)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out[rank : rank + 1])
    whole = x.clone().requires_grad_()
    out_ref = ref(whole)
    out_ref = out_ref[0] if isinstance(out_ref, tuple) else out_ref
    out_ref.backward(grad_out)
    torch.testing.assert_close(out, out_ref[rank : rank + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.grad, whole.grad[rank : rank + 1], rtol=1e-5, atol=1e-6)
    reference = dict(ref.named_parameters())
    for name, param in block.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):  # an expert: this rank's experts saw every token,
            grad = grad.full_tensor() * 2  # divided by ep (FSDP2's average divides the rest)
        else:  # the router: each rank's tokens, summed as data parallelism would
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    print(f"ok {family}", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    for family in FAMILIES:
        check(family, dist.get_rank(), mesh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
