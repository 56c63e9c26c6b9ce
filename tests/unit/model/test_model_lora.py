"""LoRA: matching, init, forward semantics, training, PEFT round trip, merge, memory."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.config.compat import megatron_to_hf_patterns
from sftkit.config.derive import derive_config
from sftkit.config.schema import MasterConfig, PolicyConfig
from sftkit.model import lora as L
from sftkit.model.lora import (
    LoraLinear,
    LoraSpec,
    apply_lora,
    load_lora_state_dict,
    lora_spec_from_config,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def derived(pcfg: PolicyConfig) -> PolicyConfig:
    """`pcfg` as loading derives it (Megatron's peft translated into lora_cfg, use_triton)."""
    return derive_config(MasterConfig(policy=pcfg)).policy


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


IDS = torch.tensor([[5, 17, 3, 44, 8, 91, 2, 60], [1, 2, 3, 4, 5, 6, 7, 8]])


# ----------------------------------------------------------------- matching


def selected(spec: LoraSpec) -> list[str]:
    return L.select_lora_modules(tiny_llama(), spec)


def test_match_all_linear_skips_lm_head() -> None:
    names = selected(LoraSpec(match_all_linear=True))
    assert len(names) == 14 and "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == set(PROJ)


def test_wildcards_bare_names_and_exclusions() -> None:
    assert selected(LoraSpec(match_all_linear=False, target_modules=["*.layers.0.*.q_proj"])) == [
        "model.layers.0.self_attn.q_proj"
    ]
    assert selected(LoraSpec(match_all_linear=False, target_modules=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]  # fmt: skip
    assert selected(LoraSpec(match_all_linear=False, target_modules=["mlp.up_proj"])) == [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]  # fmt: skip
    only0 = selected(LoraSpec(match_all_linear=True, exclude_modules=["*.layers.1.*"]))
    assert len(only0) == 7 and all(".layers.0." in n for n in only0)
    no_mlp = selected(LoraSpec(match_all_linear=False, exclude_modules=["*mlp*"]))
    assert len(no_mlp) == 8 and "mlp" not in "".join(no_mlp)  # lm_head still skipped
    assert "lm_head" in selected(LoraSpec(match_all_linear=False, target_modules=["lm_head"]))
    assert len(selected(LoraSpec(match_all_linear=False))) == 14  # Automodel default "*_proj"


def test_match_all_linear_overrides_targets_with_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        names = selected(LoraSpec(match_all_linear=True, target_modules=["q_proj"]))
    assert len(names) == 14
    assert "overrides target_modules" in caplog.text


def test_unmatched_pattern_warns_and_nothing_raises(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        selected(LoraSpec(match_all_linear=False, target_modules=["q_proj", "qq_proj"]))
    assert "'qq_proj' matches no linear layer" in caplog.text
    with pytest.raises(ValueError, match="adapts no module"):
        selected(LoraSpec(match_all_linear=False, target_modules=["nothing"]))


def test_megatron_names_and_config(caplog) -> None:
    assert megatron_to_hf_patterns(["*.layers.0.*.linear_qkv", "linear_fc2"]) == [
        "*.layers.0.*.q_proj", "*.layers.0.*.k_proj", "*.layers.0.*.v_proj", "down_proj"]  # fmt: skip
    assert megatron_to_hf_patterns(["decoder.layers.1.self_attention.linear_proj"]) == [
        "model.layers.1.self_attn.o_proj"]  # fmt: skip
    pcfg = PolicyConfig()
    pcfg.megatron_cfg.enabled = True
    pcfg.megatron_cfg.peft.enabled = True
    pcfg.megatron_cfg.peft.target_modules = ["*.layers.0.*.linear_qkv", "linear_fc1"]
    pcfg.megatron_cfg.peft.lora_dtype = "None"
    with caplog.at_level(logging.INFO):
        spec = lora_spec_from_config(derived(pcfg))
    assert spec is not None and not spec.match_all_linear and spec.lora_dtype == torch.float32
    assert "Honoured" in caplog.text and "a2a_experimental" in caplog.text
    names = L.select_lora_modules(tiny_llama(), spec)
    assert sorted(n for n in names if ".layers.0.self_attn" in n) == [
        f"model.layers.0.self_attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]  # fmt: skip
    assert (
        "model.layers.1.mlp.gate_proj" in names and "model.layers.1.self_attn.q_proj" not in names
    )
    pcfg.megatron_cfg.peft.lora_dtype = "bf16"
    assert lora_spec_from_config(derived(pcfg)).lora_dtype == torch.bfloat16  # type: ignore[union-attr]
    pcfg.megatron_cfg.peft.exclude_modules = ["linear_fc2"]
    with pytest.raises(ValueError, match="mutually exclusive"):
        lora_spec_from_config(derived(pcfg))


def test_dtensor_config() -> None:
    pcfg = PolicyConfig()
    assert lora_spec_from_config(pcfg) is None
    pcfg.dtensor_cfg.lora_cfg.enabled = True
    pcfg.dtensor_cfg.lora_cfg.dim, pcfg.dtensor_cfg.lora_cfg.alpha = 4, 16
    pcfg.dtensor_cfg.tensor_parallel_size = 2
    pcfg = derived(pcfg)
    spec = lora_spec_from_config(pcfg)
    assert spec is not None and spec.scale == 4.0 and not spec.use_triton
    pcfg.dtensor_cfg.lora_cfg.dropout_position = "middle"
    with pytest.raises(ValueError, match="'pre' or 'post'"):
        lora_spec_from_config(pcfg)


# ----------------------------------------------------------------- init and forward


@pytest.mark.parametrize("init", ["xavier", "uniform"])
def test_init_statistics(init: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 384)).to(torch.bfloat16)
    apply_lora(model, LoraSpec(dim=64, lora_A_init=init))  # type: ignore[arg-type]
    layer = model[0]
    a = layer.lora_A.weight
    assert a.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    if init == "xavier":  # normal, std sqrt(2 / (fan_in + fan_out))
        assert a.std().item() == pytest.approx(math.sqrt(2 / (512 + 64)), rel=0.03)
        assert a.abs().max().item() > 3 * a.std().item()  # normal tails, not uniform
    else:  # kaiming uniform a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(512)
        assert a.abs().max().item() <= bound and a.abs().max().item() > 0.99 * bound
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert not layer.weight.requires_grad and a.requires_grad


def test_first_forward_equals_base_and_names_kept() -> None:
    model = tiny_llama()
    base_keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(IDS).logits
    names = apply_lora(model, LoraSpec(dim=4))
    with torch.no_grad():
        out = model(IDS).logits
    assert torch.equal(out, ref)
    assert isinstance(model.get_submodule(names[0]), LoraLinear)
    assert base_keys <= set(model.state_dict())  # weight/bias names unchanged
    with pytest.raises(ValueError, match="apply it once"):
        apply_lora(model, LoraSpec())


def test_pre_and_post_dropout() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    outs = {}
    for pos in ("pre", "post"):
        layer = nn.Sequential(nn.Linear(16, 12))
        layer[0].load_state_dict(nn.Linear(16, 12).state_dict())
        torch.manual_seed(1)
        layer[0].weight.data.normal_()
        apply_lora(layer, LoraSpec(dim=4, alpha=8, dropout=0.5, dropout_position=pos))  # type: ignore[arg-type]
        m = layer[0]
        torch.nn.init.normal_(m.lora_B.weight)
        base = x @ m.weight.t() + m.bias
        branch = 2.0 * (x @ m.lora_A.weight.t()) @ m.lora_B.weight.t()
        m.eval()
        torch.testing.assert_close(m(x), base + branch)  # eval: no dropout anywhere
        m.train()
        torch.manual_seed(7)
        out = m(x)
        torch.manual_seed(7)
        if pos == "pre":  # the same draws, on the LoRA input only
            mask = nn.functional.dropout(torch.ones_like(x), 0.5)
            expected = base + 2.0 * ((x * mask) @ m.lora_A.weight.t()) @ m.lora_B.weight.t()
        else:  # on the LoRA output only
            mask = nn.functional.dropout(torch.ones(6, 12), 0.5)
            expected = base + branch * mask
        torch.testing.assert_close(out, expected)
        outs[pos] = out.detach()
    assert not torch.allclose(outs["pre"], outs["post"])


def test_only_lora_params_change_after_step() -> None:
    model = tiny_llama().train()
    apply_lora(
        model, LoraSpec(dim=4, match_all_linear=False, target_modules=["q_proj", "down_proj"])
    )
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if ".lora_" in k}
    assert changed == lora_keys and len(lora_keys) == 8
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


# ----------------------------------------------------------------- PEFT, merge


@pytest.mark.parametrize("targets", [[], ["*.layers.0.*.q_proj", "*.layers.1.*.down_proj"]])
def test_peft_round_trip_equal_logits(tmp_path, monkeypatch, targets: list[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    spec = LoraSpec(dim=4, alpha=8, match_all_linear=not targets, target_modules=targets)
    apply_lora(model, spec)
    randomize_lora(model)
    with torch.no_grad():
        ours = model(IDS).logits
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "no-such-base"), spec)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = loaded(IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    n_peft = sum(1 for n, _ in loaded.named_modules() if n.endswith("lora_A.default"))
    assert n_peft == len(L.lora_modules(model))
    # And back: PEFT's state dict loads into a fresh sftkit model.
    fresh = tiny_llama()
    apply_lora(fresh, spec)
    load_lora_state_dict(fresh, peft.get_peft_model_state_dict(loaded))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, ours)
    sd = lora_state_dict(model)
    assert all(k.startswith("base_model.model.model.layers.") for k in sd)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state_dict(fresh, {k + "x": v for k, v in sd.items()})


def test_merged_export_equals_adapter(tmp_path) -> None:
    model = tiny_llama()
    apply_lora(model, LoraSpec(dim=4, alpha=8))
    randomize_lora(model)
    with torch.no_grad():
        ours = model(IDS).logits
    merge_lora(model)
    assert not L.lora_modules(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora" in k for k in model.state_dict())
    model.save_pretrained(tmp_path / "hf")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, ours, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- memory-efficient autograd


def _lora_layer(bias: bool = True, r: int = 3) -> LoraLinear:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(24, 40, bias=bias))
    apply_lora(seq, LoraSpec(dim=r, alpha=6))
    nn.init.normal_(seq[0].lora_B.weight)
    return seq[0]


def test_saved_tensors_exclude_xa() -> None:
    layer = _lora_layer()
    x = torch.randn(37, 24, requires_grad=True)
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (37, 24) in shapes and (37, 3) not in shapes  # x saved, x A^T not
    # The composite (plain autograd) version does save x A^T: the check can fail.
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        A, B = layer.lora_A.weight, layer.lora_B.weight
        nn.functional.linear(nn.functional.linear(x, A), B)
    assert (37, 3) in shapes
    y.sum().backward()


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_function_grads_match_composite(x_grad: bool, bias: bool) -> None:
    layer = _lora_layer(bias=bias)
    for p in layer.parameters():  # also checks the weight and bias gradient paths
        p.requires_grad_(True)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    layer.double()
    params = [p for p in layer.parameters()]

    def run(fn):
        xx = x.clone().requires_grad_(x_grad)
        out = fn(xx)
        grads = torch.autograd.grad((out * out).sum(), params + ([xx] if x_grad else []))
        return out.detach(), grads

    def reference(xx: torch.Tensor) -> torch.Tensor:
        base = nn.functional.linear(xx, layer.weight, layer.bias)
        return base + 2.0 * (xx @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()

    out, grads = run(layer)
    ref_out, ref_grads = run(reference)
    torch.testing.assert_close(out, ref_out)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


def test_autocast_bf16_forward_backward() -> None:
    layer = _lora_layer()
    x = torch.randn(8, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32
