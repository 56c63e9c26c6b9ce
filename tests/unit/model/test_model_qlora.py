"""QLoRA: NF4 base layers quantized while loading, their bytes, forward/backward and merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftkit.config import load_config
from sftkit.model.lora import LoraSpec, lora_modules, merge_lora
from sftkit.model.qlora import (
    QuantSpec,
    block_sizes,
    build_quantized_model,
    is_quantized,
    nf4_bytes,
    tensor_bytes,
)

pytest.importorskip("torchao")
QUICKSTART = Path(__file__).resolve().parents[3] / "examples" / "configs" / "quickstart.yaml"
SPEC = QuantSpec(compute_dtype=torch.float32, block_size=64, scaler_block_size=256)


@pytest.fixture(scope="module")
def qlora(tiny_model_dir: Path) -> tuple[torch.nn.Module, list[str]]:
    files = sorted(tiny_model_dir.glob("*.safetensors"))
    options = {"param_dtype": torch.float32, "trust_remote_code": False,
               "attn_implementation": None, "config_overrides": {}}  # fmt: skip
    return build_quantized_model(str(tiny_model_dir), options, LoraSpec(dim=8), SPEC, files,
                                 torch.get_rng_state())  # fmt: skip


def test_nf4_layers_take_under_0_3x_their_bf16_bytes(qlora, tiny_model_dir: Path) -> None:
    model, names = qlora
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert len(names) == 28  # 4 layers x 7 projections; the head is never adapted
    nf4 = bf16 = 0
    for name in names:
        weight = model.get_submodule(name).weight
        assert is_quantized(weight) and not weight.requires_grad
        assert tensor_bytes(weight) == nf4_bytes(weight.numel(), name, SPEC)  # the formula
        nf4, bf16 = nf4 + tensor_bytes(weight), bf16 + 2 * weight.numel()
        original = dense.get_submodule(name).weight
        err = (weight.to(torch.float32) - original).norm() / original.norm()
        assert err < 0.12, (name, float(err))  # 4-bit NormalFloat: ~0.1 of the norm
    assert nf4 <= 0.3 * bf16, (nf4, bf16)
    # head, embeddings and norms stay dense and frozen, with the file's values
    assert not is_quantized(model.lm_head.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, dense.model.norm.weight)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_nf4_forward_and_backward_equal_the_dequantized_dense_layer(qlora) -> None:
    model, names = qlora
    layer = model.get_submodule(names[0])
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # B = 0 would hide the LoRA branch
    dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(layer.weight.to(torch.float32))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    got = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x.grad = None
    a = layer.lora_A.weight.detach().requires_grad_()
    b = layer.lora_B.weight.detach().requires_grad_()
    ref = dense(x) + layer.lora_scale * (x @ a.t()) @ b.t()
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, (x.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    merged = {n: m.weight.to(torch.float32) for n, m in lora_modules(model).items()}
    expected = dense.weight + layer.lora_scale * b.detach() @ a.detach()
    merge_lora(model)  # into the dequantized base: a plain dense Linear again
    weight = model.get_submodule(names[0]).weight
    assert type(model.get_submodule(names[0])) is torch.nn.Linear and not is_quantized(weight)
    torch.testing.assert_close(weight, expected)
    assert all(not is_quantized(model.get_submodule(n).weight) for n in merged)


def test_block_sizes_divide_the_weight_or_fail_naming_the_key() -> None:
    assert block_sizes("mlp.up_proj", 352 * 128, SPEC) == (
        64,
        176,
    )  # 704 blocks: 256 does not divide
    with pytest.raises(ValueError, match="quantize_block_size=64 x 1 FSDP shard"):
        block_sizes("q_proj", 96, SPEC)


def test_megatron_peft_spelling_and_the_derived_compute_dtype() -> None:
    cfg = load_config(str(QUICKSTART), ["policy.megatron_cfg.enabled=true",
                      "policy.megatron_cfg.peft.enabled=true",
                      "policy.megatron_cfg.peft.quantize_base=nf4"])  # fmt: skip
    lora = cfg.policy.dtensor_cfg.lora_cfg
    assert (lora.enabled, lora.quantize_base, lora.quantize_compute_dtype) == (
        True,
        "nf4",
        "float32",
    )


def test_dora_on_an_nf4_base_starts_at_the_dequantized_row_norms(tiny_model_dir: Path) -> None:
    from sftkit.model.dora import magnitude

    files = sorted(tiny_model_dir.glob("*.safetensors"))
    options = {"param_dtype": torch.float32, "trust_remote_code": False,
               "attn_implementation": None, "config_overrides": {}}  # fmt: skip
    model, names = build_quantized_model(str(tiny_model_dir), options,
                                         LoraSpec(dim=8, use_dora=True), SPEC, files,
                                         torch.get_rng_state())  # fmt: skip
    layer = model.get_submodule(names[0])
    assert is_quantized(layer.weight)
    expected = torch.linalg.norm(layer.weight.to(torch.float32), dim=1)
    torch.testing.assert_close(magnitude(layer).detach(), expected)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ layer.weight.to(torch.float32).t())  # B = 0


def test_missing_torchao_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchao (it is the `fp8` extra, not a core dependency) QLoRA says what to install."""
    import sys

    from sftkit.model import qlora

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    spec = qlora.QuantSpec(compute_dtype=torch.float32, block_size=64, scaler_block_size=256)
    with pytest.raises(ValueError, match=r"quantize_base=nf4 needs torchao: `pip install torchao`"):
        qlora.quantize("layer.weight", torch.ones(64, 64), spec)
