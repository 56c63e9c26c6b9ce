"""MoE router balancing loss: a step's gradients and `train/aux_loss` equal HF's `forward`.

Tiny float32 MoE models on CPU (4 experts, 2 per token). HF's reference is the model's own
`forward(input_ids, attention_mask, labels, output_router_logits=True)`: `loss` (mean NLL +
coef x aux) and `aux_loss`. Gradients are captured by an optimizer whose `step` records them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from sftkit.batch import PackedBatch
from sftkit.data.loader import BatchPlan, micro_batches
from sftkit.data.types import Example
from sftkit.dist import DistEnv
from sftkit.model.attention import enable_packed_attention
from sftkit.train.moe import ROUTER_LOSS_FAMILIES, router_loss_for
from sftkit.train.step import StepOptions, train_step

ENV = DistEnv()
VOCAB, COEF = 64, 0.5  # a large coefficient: dropping the term moves the loss by ~0.5

SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(SHAPE, head_dim=8, **MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(SHAPE, shared_expert_intermediate_size=24, **MOE)),
    "mixtral": ("MixtralConfig", dict(SHAPE, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(SHAPE, **MOE)),
    "gpt_oss": (
        "GptOssConfig",
        dict(SHAPE, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    ),  # fmt: skip
}


class Capture(torch.optim.SGD):
    """SGD with lr=0 that remembers the gradients it was asked to apply."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def tiny_moe(family: str, on: bool = True, coef: float = COEF, seed: int = 0) -> nn.Module:
    name, kwargs = CONFIGS[family]
    config = getattr(transformers, name)(
        **kwargs, output_router_logits=on, router_aux_loss_coef=coef
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # routers start near uniform; spread them so the loss has a slope
        for n, p in model.named_parameters():
            if "router" in n or n.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


def examples(count: int = 6, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(6, 16)
        prompt = rng.randint(2, n - 2)
        ids = [rng.randrange(2, VOCAB) for _ in range(n)]
        out.append(Example(ids, [0] * prompt + [1] * (n - prompt), "t"))
    return out


def sftkit_step(
    model: nn.Module, batches: list[PackedBatch], chunked: bool = True
) -> tuple[dict[str, float], list[torch.Tensor]]:
    opts = StepOptions(torch.float32, None, chunked_loss=chunked, chunk_size=7,
                       router=router_loss_for(model, ENV))  # fmt: skip
    optimizer = Capture(list(model.parameters()))
    model.zero_grad(set_to_none=True)
    tokens = sum(b.num_target_tokens for b in batches)
    return train_step(model, optimizer, batches, tokens, opts, ENV, step=1), optimizer.grads


def hf_reference(
    model: nn.Module, batches: list[PackedBatch], on: bool
) -> tuple[float, float, list[torch.Tensor]]:
    """HF's forward per padded micro-batch, weighted by its share of the targets: (NLL
    mean, aux, gradients); one micro-batch is exactly HF's `loss.backward()`."""
    total = sum(b.num_target_tokens for b in batches)
    nll = aux = 0.0
    model.zero_grad(set_to_none=True)
    for b in batches:
        assert b.cu_seqlens is None and b.real_tokens is not None
        out = model(input_ids=b.input_ids, attention_mask=b.real_tokens, labels=b.labels,
                    output_router_logits=on, use_cache=False)  # fmt: skip
        share = b.num_target_tokens / total
        (out.loss * share).backward()
        if on:
            aux += share * float(out.aux_loss.detach())
            nll += share * float((out.loss - model.router_aux_loss_coef * out.aux_loss).detach())
        else:
            nll += share * float(out.loss.detach())
    return nll, aux, [p.grad.clone() for p in model.parameters()]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_one_micro_batch_equals_hf_forward_with_the_aux_term(family: str) -> None:
    assert family in ROUTER_LOSS_FAMILIES
    model = tiny_moe(family)
    batches = micro_batches(examples(), BatchPlan(micro_batch_size=6))
    assert len(batches) == 1
    nll, aux, want = hf_reference(model, batches, on=True)
    result, grads = sftkit_step(model, batches)
    assert result["loss"] == pytest.approx(nll, rel=1e-6)  # train/loss stays the NLL
    assert result["train/aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert rel(grads, want) <= 1e-6
    # Control: the term matters (HF's gradients without it are far from these).
    _, _, without = hf_reference(tiny_moe(family, on=False), batches, on=False)
    assert rel(without, want) > 1e-3
    assert (
        0
        <= result["train/moe/load_cv_max"]
        == max(result[f"train/moe/load_cv/layer_{i}"] for i in range(2))
    )


def test_output_router_logits_off_trains_the_nll_and_still_logs_the_load() -> None:
    model = tiny_moe("qwen3_moe", on=False)
    batches = micro_batches(examples(), BatchPlan(micro_batch_size=6))
    nll, _, want = hf_reference(model, batches, on=False)
    result, grads = sftkit_step(model, batches)
    assert result["loss"] == pytest.approx(nll, rel=1e-6)
    assert rel(grads, want) <= 1e-6
    # The aux value is logged (as HF's aux_loss with output_router_logits on), not trained.
    _, aux, _ = hf_reference(model, batches, on=True)
    assert result["train/aux_loss"] == pytest.approx(aux, rel=1e-6)


@pytest.mark.parametrize("chunked", [True, False])
def test_micro_batches_weight_the_aux_term_by_their_share_of_targets(chunked: bool) -> None:
    model = tiny_moe("mixtral")
    batches = micro_batches(examples(7, seed=1), BatchPlan(micro_batch_size=3))
    assert len(batches) == 3
    nll, aux, want = hf_reference(model, batches, on=True)
    result, grads = sftkit_step(model, batches, chunked)
    assert result["loss"] == pytest.approx(nll, rel=1e-6)
    assert result["train/aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert rel(grads, want) <= 1e-6


def test_packed_rows_count_only_real_tokens() -> None:
    """A packed micro-batch (with a pad tail) gives HF's padded forward of its documents:
    same token set under the attention mask, so the same aux loss and gradients."""
    data = examples(5, seed=2)
    model = tiny_moe("qwen3_moe")
    padded = micro_batches(data, BatchPlan(micro_batch_size=5))
    nll, aux, want = hf_reference(model, padded, on=True)
    enable_packed_attention(model)
    packed = micro_batches(data, BatchPlan(micro_batch_size=5, mode="packed", mb_tokens=80,
                                           length_round=16))  # fmt: skip
    assert len(packed) == 1 and packed[0].real_tokens is not None
    assert int(packed[0].real_tokens.sum()) < packed[0].input_ids.numel()  # a pad tail
    result, grads = sftkit_step(model, packed)
    assert result["loss"] == pytest.approx(nll, rel=1e-6)
    assert result["train/aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert rel(grads, want) <= 1e-6


def test_nemo_rl_gpt_oss_recipe_value_turns_it_off(tmp_path: Path) -> None:
    """NeMo RL's gpt-oss recipe: `policy.hf_config_overrides.router_aux_loss_coef: 0.0`."""
    from sftkit.model.load import load_model

    tiny_moe("gpt_oss", on=True).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), config_overrides={"router_aux_loss_coef": 0.0})
    router = router_loss_for(model, ENV)
    assert router is not None and not router.in_loss
    batches = micro_batches(examples(), BatchPlan(micro_batch_size=6))
    nll, aux, want = hf_reference(model, batches, on=True)  # coef 0: HF's loss is the NLL
    result, grads = sftkit_step(model, batches)
    assert result["loss"] == pytest.approx(nll, rel=1e-6)
    assert rel(grads, want) <= 1e-6
    assert result["train/aux_loss"] == pytest.approx(aux, rel=1e-6) and aux > 0


def test_a_family_without_a_reproducible_router_loss_is_refused() -> None:
    config = transformers.Llama4TextConfig(
        **dict(SHAPE, head_dim=8, intermediate_size_mlp=48), num_local_experts=4,
        num_experts_per_tok=1, output_router_logits=True, router_aux_loss_coef=0.01,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.0"):
        router_loss_for(model, ENV)
    model.config.router_aux_loss_coef = 0.0  # off: nothing to reproduce
    assert router_loss_for(model, ENV) is None


@pytest.mark.slow
def test_two_ranks_weight_each_micro_batch_by_its_share_of_the_global_targets(
    tmp_path: Path,
) -> None:
    out = tmp_path / "result.pt"
    worker = Path(__file__).with_name("moe_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(worker), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert got["result"]["loss"] == pytest.approx(got["nll"], rel=1e-6)
    assert got["result"]["train/aux_loss"] == pytest.approx(got["aux"], rel=1e-6)
    assert rel(got["grads"], got["ref_grads"]) <= 1e-6


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_records_each_router_once(mode: str) -> None:
    """Gradients flow through the recorded router outputs of checkpointed layers, and the
    recomputation in the backward (outside the recording) adds nothing."""
    from sftkit.model.parallel import apply_activation_checkpointing

    model = tiny_moe("qwen3_moe")
    batches = micro_batches(examples(), BatchPlan(micro_batch_size=6))
    nll, aux, want = hf_reference(model, batches, on=True)
    apply_activation_checkpointing(model, mode)
    result, grads = sftkit_step(model, batches)
    assert result["train/aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert rel(grads, want) <= 1e-6
