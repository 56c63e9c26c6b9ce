"""The optimizer step on CUDA: device-side clip and update against the host-checked one."""

from __future__ import annotations

import math

import pytest
import torch

from sftkit.data.loader import BatchPlan, micro_batches
from sftkit.dist import DistEnv
from sftkit.train.step import NonFiniteError, StepOptions, train_step
from tests.unit.train.test_train_step import examples, rel, snapshot, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_device_side_update_matches_the_host_checked_one() -> None:
    """On a GPU: the pinned-memory read after an event, the fused clip, and the skip."""
    env = DistEnv(device=torch.device("cuda"))
    data = examples()
    step_opts = StepOptions(torch.float32, 0.05, chunked_loss=True, chunk_size=7)
    runs = []
    for fused in (False, True):
        model = tiny_model().cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, fused=fused)
        batches = micro_batches(data, BatchPlan(micro_batch_size=3))
        tokens = sum(b.num_target_tokens for b in batches)
        results = [train_step(model, optimizer, batches, tokens, step_opts, env, step=s)
                   for s in range(1, 4)]  # fmt: skip
        runs.append((results, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (host, host_w), (device, device_w) = runs
    for h, d in zip(host, device, strict=True):
        assert d["loss"] == pytest.approx(h["loss"], rel=1e-5)
        assert d["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-4)
    assert rel(device_w, host_w) < 1e-5
    model.model.norm.register_forward_hook(lambda m, i, out: out * math.nan)  # chunked head
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        train_step(model, optimizer, batches, tokens, step_opts, env, step=4)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
