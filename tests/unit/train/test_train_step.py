"""train_step: micro-batching never changes loss or gradients; non-finite values stop the step.

A tiny float32 Llama on CPU. Gradients are captured by an optimizer whose `step` records
them (train_step clears them after the update).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.data.loader import BatchPlan, micro_batches
from sftkit.data.types import Example
from sftkit.dist import DistEnv
from sftkit.model.attention import enable_packed_attention
from sftkit.train.step import (
    NonFiniteError,
    StepOptions,
    device_side_update,
    supports_chunked_loss,
    train_step,
)

ENV = DistEnv()


class Capture(torch.optim.SGD):
    """SGD with lr=0 that remembers the gradients it was asked to apply."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).float()
    enable_packed_attention(model)  # packed rows never attend across documents
    return model


def examples(count: int = 8, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(6, 20)
        prompt = rng.randint(2, n - 2)
        ids = [rng.randrange(1, 64) for _ in range(n)]
        out.append(Example(ids, [0] * prompt + [1] * (n - prompt), "t"))
    return out


def opts(chunked: bool) -> StepOptions:
    return StepOptions(torch.float32, max_grad_norm=None, chunked_loss=chunked, chunk_size=7)


def direct_loss(model: LlamaForCausalLM, data: list[Example]) -> torch.Tensor:
    """Token-level NLL over the whole global batch, one unpadded example at a time."""
    total, tokens = torch.zeros(()), 0
    for e in data:
        ids = torch.tensor([e.input_ids])
        logits = model(ids).logits[0, :-1]
        mask = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        total = total + F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
        tokens += int(mask.sum())
    return total / tokens


def step_with(
    plan: BatchPlan, data: list[Example], chunked: bool
) -> tuple[float, list[torch.Tensor]]:
    model = tiny_model()
    optimizer = Capture(list(model.parameters()))
    batches = micro_batches(data, plan)
    tokens = sum(b.num_target_tokens for b in batches)
    result = train_step(model, optimizer, batches, tokens, opts(chunked), ENV, step=1)
    return result["loss"], optimizer.grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("chunked", [False, True])
def test_any_micro_batch_split_gives_the_same_loss_and_gradients(chunked: bool) -> None:
    data = examples()
    model = tiny_model()
    assert supports_chunked_loss(model)
    loss_tensor = direct_loss(model, data)
    loss_tensor.backward()
    want = float(loss_tensor.detach())
    want_grads = [p.grad for p in model.parameters()]
    plans = [BatchPlan(micro_batch_size=size) for size in (1, 3, 8)] + [
        BatchPlan(micro_batch_size=8, mode="dynamic", mb_tokens=40, length_round=1),
        BatchPlan(micro_batch_size=8, mode="packed", mb_tokens=48, length_round=1),
    ]
    for plan in plans:
        loss, grads = step_with(plan, data, chunked)
        # The logged loss is the optimized loss: the direct whole-batch computation.
        assert abs(loss - want) / want <= 1e-6, plan
        grad_rel = rel(torch.cat([g.flatten() for g in grads]),
                       torch.cat([g.flatten() for g in want_grads]))  # fmt: skip
        assert grad_rel <= 1e-6, (plan, grad_rel)


def test_uneven_split_differs_from_a_per_micro_batch_mean() -> None:
    """Control: averaging per micro-batch (the common bug) is measurably different."""
    data = examples()
    model = tiny_model()
    with torch.no_grad():
        per_mb = [direct_loss(model, data[i : i + 3]) for i in range(0, 8, 3)]
        whole = direct_loss(model, data)
    assert abs(float(sum(per_mb) / len(per_mb)) - float(whole)) > 1e-4


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# fused=True takes the device-side path: clip and skip inside torch's fused AdamW kernel.
@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_gradient_stops_before_the_update(fused: bool) -> None:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    assert device_side_update(optimizer, ENV) is fused
    batches = micro_batches(examples(), BatchPlan(micro_batch_size=4))
    tokens = sum(b.num_target_tokens for b in batches)
    train_step(model, optimizer, batches, tokens, opts(False), ENV, step=1)  # a healthy step
    before, state_before = snapshot(model), optimizer.state_dict()["state"][0]["step"].clone()
    model.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteError, match=r"gradient at step 2 on rank 0"):
        train_step(model, optimizer, batches, tokens, opts(False), ENV, step=2)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
    assert torch.equal(optimizer.state_dict()["state"][0]["step"], state_before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_loss_stops_before_the_update(fused: bool) -> None:
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    model.lm_head.register_forward_hook(lambda m, i, out: out * math.nan)
    batches = micro_batches(examples(), BatchPlan(micro_batch_size=8))
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5 on rank 0") as err:
        train_step(model, optimizer, batches, 10, opts(False), ENV, step=5)
    assert "last checkpoint is untouched" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model), strict=True))
    # The fused kernel saw the skip flag: its state exists but no step was counted.
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_device_side_clipping_matches_the_host_checked_update(name: str) -> None:
    """Clipping inside torch's fused kernel (grad / max(norm / max_norm, 1)) gives the same
    losses, norms and weights as clip_grad_norm_ then the unfused step. SGD makes a wrong
    clip visible in the weights (Adam is nearly blind to a uniform gradient scale)."""
    data = examples()

    def run(fused: bool, max_norm: float | None) -> tuple[list[dict], list[torch.Tensor]]:
        model = tiny_model()
        optimizer = getattr(torch.optim, name)(model.parameters(), lr=1e-2, fused=fused)
        assert device_side_update(optimizer, ENV) is fused
        batches = micro_batches(data, BatchPlan(micro_batch_size=3))
        tokens = sum(b.num_target_tokens for b in batches)
        step_opts = StepOptions(torch.float32, max_norm, chunked_loss=True, chunk_size=7)
        results = [train_step(model, optimizer, batches, tokens, step_opts, ENV, step=s)
                   for s in range(1, 4)]  # fmt: skip
        return results, snapshot(model)

    def flat(weights: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([w.flatten() for w in weights])

    (host, host_weights), (device, device_weights) = run(False, 0.05), run(True, 0.05)
    assert host[0]["grad_norm"] > 10 * 0.05  # clipping is active
    for h, d in zip(host, device, strict=True):
        assert d["loss"] == pytest.approx(h["loss"], rel=1e-6)
        assert d["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-5)
    assert rel(flat(device_weights), flat(host_weights)) < 1e-6
    _, unclipped = run(True, None)  # control: without the clip the weights end elsewhere
    assert rel(flat(unclipped), flat(host_weights)) > 1e-4
