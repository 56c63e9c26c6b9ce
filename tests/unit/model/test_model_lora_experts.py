"""LoRA on MoE experts' fused 3-D weights (`sftkit/model/lora_experts.py`): only adapters
train, every experts implementation sees the delta, PEFT loads the export with the same
logits, merge equals the adapted model, and the sharded init replays one process's draws."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from sftkit.model import lora_experts
from sftkit.model.lora import LoraSpec, apply_lora, merge_lora, save_adapter

VOCAB = 64


def tiny(family: str, impl: str = "eager") -> nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=48, num_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=24)  # fmt: skip
    else:  # gpt-oss: transposed [E, in, out] weights with biases, interleaved gate/up
        config = transformers.GptOssConfig(**common, intermediate_size=24, num_local_experts=4,
                                           num_experts_per_tok=2,
                                           layer_types=["full_attention"] * 2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation=impl, attn_implementation="eager"
    )
    with torch.no_grad():  # the router's zero init would tie every expert choice
        for p in model.parameters():
            if p.dim() >= 2 and not p.is_meta and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


def spec(**kw: object) -> LoraSpec:
    return LoraSpec(target_modules=["q_proj", "v_proj"], match_all_linear=False, dim=2,
                    alpha=4.0, target_experts=True, **kw)  # type: ignore[arg-type]  # fmt: skip


def randomise_b(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)


def adapted(family: str, impl: str = "eager") -> nn.Module:
    model = tiny(family, impl)  # seeds the RNG: the same A every time
    apply_lora(model, spec())
    randomise_b(model)
    return model


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_experts_get_adapters_that_start_at_the_base_and_alone_train() -> None:
    model = tiny("qwen3_moe")
    base = logits(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, spec())
    experts = model.model.layers[0].mlp.experts
    assert experts.lora_A["gate_up_proj"].shape == (4, 2, 32)  # [E, r, hidden]
    assert experts.lora_B["gate_up_proj"].shape == (4, 48, 2)  # [E, 2 x 24, r]
    assert experts.lora_A["down_proj"].shape == (4, 2, 24)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.1.mlp.experts.lora_A.down_proj" in trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = dict(model.named_parameters())
    for name, value in frozen.items():  # the base is untouched, the weights still Parameters
        assert isinstance(after[name], nn.Parameter)
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)
    assert experts.lora_B["down_proj"].abs().sum() > 0


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_every_experts_implementation_sees_the_delta(impl: str) -> None:
    reference, model = adapted("qwen3_moe"), adapted("qwen3_moe", impl)
    merged = copy.deepcopy(reference)
    merge_lora(merged)
    want = logits(merged)
    assert (want - logits(tiny("qwen3_moe"))).abs().max() > 1e-2  # the delta matters
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_peft_loads_the_export_with_the_same_logits(family: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny(family)
    base = copy.deepcopy(model)
    apply_lora(model, spec())
    randomise_b(model)
    want = logits(model)
    save_adapter(model, tmp_path, "base", spec())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    got = logits(loaded)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trips_through_peft_names() -> None:
    from sftkit.model.lora import load_lora_state_dict, lora_state_dict

    model = tiny("qwen3_moe")
    apply_lora(model, spec())
    randomise_b(model)
    sd = lora_state_dict(model)
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in sd
    assert sd["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape == (32, 8)
    other = tiny("qwen3_moe")
    apply_lora(other, spec())
    load_lora_state_dict(other, sd)
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


def test_exclude_selects_experts_and_export_names_them_exactly(tmp_path: Path) -> None:
    model = tiny("qwen3_moe")
    apply_lora(model, spec(exclude_modules=["layers.0.mlp.experts"]))
    assert list(lora_experts.adapted_expert_modules(model)) == ["model.layers.1.mlp.experts"]
    assert lora_experts.peft_target_parameters(model) == [
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.gate_up_proj",
    ]


def test_sharded_init_replays_one_process_draws() -> None:
    from sftkit.model.parallel import init_lora_sharded

    rng = torch.get_rng_state()
    one = tiny("qwen3_moe")
    torch.set_rng_state(rng)
    apply_lora(one, spec())
    with torch.device("meta"):
        meta = tiny("qwen3_moe")
    apply_lora(meta, spec())
    meta.to_empty(device="cpu")
    init_lora_sharded(meta, "xavier", rng)
    want = {n: p for n, p in one.named_parameters() if ".lora_" in n}
    for name, p in meta.named_parameters():
        if ".lora_" in name:
            torch.testing.assert_close(p, want[name], rtol=0, atol=0)


def test_a_dense_model_and_dropout_are_refused() -> None:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    dense = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="no MoE experts module"):
        apply_lora(dense, spec())
    with pytest.raises(ValueError, match="dropout"):
        spec(dropout=0.1)


# compile: dynamo traces the swap hooks (about 8 CPU seconds, hence `slow`)
@pytest.mark.parametrize(
    "transform", ["checkpointing", pytest.param("compile", marks=pytest.mark.slow)]
)
def test_gradients_are_the_same_under_checkpointing_and_compile(transform: str) -> None:
    from sftkit.model.fused import compile_layers
    from sftkit.model.parallel import apply_activation_checkpointing

    grads = []
    for wrapped in (False, True):
        model = adapted("qwen3_moe").train()
        if wrapped and transform == "checkpointing":
            apply_activation_checkpointing(model, "full")
        elif wrapped:
            compile_layers(model, backend="eager")
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        # the swap is undone: the experts hold their Parameters again
        assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, nn.Parameter)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
