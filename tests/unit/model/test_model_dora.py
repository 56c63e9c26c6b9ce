"""DoRA (`use_dora`): PEFT's forward, gradients, init, export and merge; the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from test_model_lora import IDS, randomize_lora, tiny_llama
from torch import nn

from sftkit.config.checks import check_config
from sftkit.config.errors import ConfigError
from sftkit.config.schema import MasterConfig
from sftkit.model import dora
from sftkit.model import lora as L
from sftkit.model.lora import (
    LoraSpec,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

peft = pytest.importorskip("peft")


def randomize_magnitudes(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            mag = dora.magnitude(m)
            mag.mul_(torch.rand(mag.shape, generator=g) + 0.5)


def trained_dora(spec: LoraSpec) -> nn.Module:
    model = tiny_llama()
    apply_lora(model, spec)
    randomize_lora(model)
    randomize_magnitudes(model)
    return model


def relative_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    err = (got - want).abs().max() / want.abs().max()
    assert err <= rtol, float(err)


def test_first_forward_equals_base_and_magnitude_is_peft_init() -> None:
    model = tiny_llama()
    apply_lora(model, LoraSpec(dim=4, alpha=8, use_dora=True))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, tiny_llama()(IDS).logits)
    # With B != 0 the init norm includes s B A, as PEFT's DoraLinearLayer.update_layer.
    from peft.tuners.lora.dora import DoraLinearLayer

    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    dora.init_magnitude(layer)
    ref = DoraLinearLayer(fan_in_fan_out=False)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
    plain.weight = layer.weight
    ref.update_layer(base_layer=plain, lora_A=layer.lora_A.weight, lora_B=layer.lora_B.weight,
                     scaling=layer.lora_scale)  # fmt: skip
    torch.testing.assert_close(dora.magnitude(layer), ref.weight, rtol=1e-6, atol=0)
    # A base weight given as a callable (a quantised base dequantises there) is used instead.
    dora.init_magnitude(layer, lambda: 2 * layer.weight)
    assert not torch.allclose(dora.magnitude(layer), ref.weight)


@pytest.mark.parametrize("targets", [[], ["*.layers.0.*.q_proj", "*.layers.1.*.down_proj"]])
def test_peft_loads_the_adapter_with_equal_logits(tmp_path, monkeypatch, targets) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = LoraSpec(dim=4, alpha=8, use_dora=True, match_all_linear=not targets,
                    target_modules=targets)  # fmt: skip
    model = trained_dora(spec)
    with torch.no_grad():
        ours = model(IDS).logits
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "no-such-base"), spec)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        relative_close(loaded(IDS).logits, ours)
    n_mag = sum(1 for n, _ in loaded.named_parameters() if "lora_magnitude_vector" in n)
    assert n_mag == len(L.lora_modules(model))
    # And back: PEFT's state dict (magnitude keys without `.weight`) loads into sftkit.
    fresh = tiny_llama()
    apply_lora(fresh, spec)
    load_lora_state_dict(fresh, peft.get_peft_model_state_dict(loaded))
    with torch.no_grad():
        relative_close(fresh(IDS).logits, ours)
    keys = [k for k in lora_state_dict(model) if k.endswith(".lora_magnitude_vector")]
    assert len(keys) == len(L.lora_modules(model))
    # The merged model (final_hf) gives the adapter's logits.
    merge_lora(model)
    assert not any("lora" in k for k in model.state_dict())
    with torch.no_grad():
        relative_close(model(IDS).logits, ours)


def _pair(dropout: float, bias: bool) -> tuple[nn.Module, nn.Module]:
    """One sftkit DoRA layer and PEFT's, holding the same weights."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    ours = nn.Sequential(nn.Linear(24, 40, bias=bias))
    ours.load_state_dict(nn.Sequential(base).state_dict())
    spec = LoraSpec(dim=3, alpha=6, use_dora=True, dropout=dropout, dropout_position="pre",
                    use_triton=False)  # fmt: skip
    apply_lora(ours, spec)
    randomize_lora(ours)
    randomize_magnitudes(ours)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["0"],
                          use_dora=True)  # fmt: skip
    theirs = peft.get_peft_model(nn.Sequential(base), cfg)
    peft.set_peft_model_state_dict(theirs, lora_state_dict(ours))
    return ours.train(), theirs.train()


@pytest.mark.parametrize(("dropout", "bias"), [(0.0, True), (0.0, False), (0.3, True)])
def test_gradients_equal_peft(dropout: float, bias: bool) -> None:
    """Values and gradients of x, A, B and m: the norm is detached as in PEFT, and dropout
    reaches both the base term and the branch as there (same mask: same seed)."""
    ours, theirs = _pair(dropout, bias)
    grads = []
    for model in (ours, theirs):
        torch.manual_seed(1)
        x = torch.randn(5, 7, 24, requires_grad=True)
        y = model(x)
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        params.sort(key=lambda p: (p.ndim, p.shape[0]))  # m [40], A [3, 24], B [40, 3]
        assert len(params) == 3
        grads.append([y, *torch.autograd.grad((y * y.detach().cos()).sum(), [x, *params])])
    for got, want in zip(*grads, strict=True):
        relative_close(got, want)


def test_magnitude_trains_and_base_stays_frozen() -> None:
    model = trained_dora(LoraSpec(dim=4, alpha=8, use_dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {
        "lora_A",
        "lora_B",
        "lora_magnitude_vector",
    }
    model.train()
    model(IDS, labels=IDS).loss.backward()
    layer = model.model.layers[1].mlp.down_proj
    assert dora.magnitude(layer).grad.abs().sum() > 0
    assert layer.weight.grad is None


def test_dropout_post_is_refused() -> None:
    with pytest.raises(ValueError, match="dropout_position 'pre'"):
        LoraSpec(use_dora=True, dropout=0.1, dropout_position="post")
    LoraSpec(use_dora=True, dropout=0.1, dropout_position="pre")
    LoraSpec(use_dora=True, dropout=0.0, dropout_position="post")


def _config(**lora: object) -> MasterConfig:
    cfg = MasterConfig()
    cfg.policy.dtensor_cfg.lora_cfg.enabled = True
    cfg.policy.dtensor_cfg.lora_cfg.use_dora = True
    for key, value in lora.items():
        setattr(cfg.policy.dtensor_cfg.lora_cfg, key, value)
    return cfg


def test_tensor_parallel_and_post_dropout_are_config_errors(monkeypatch) -> None:
    cfg = _config()
    cfg.policy.dtensor_cfg.tensor_parallel_size = 2
    with pytest.raises(ConfigError, match=r"use_dora=true is not supported with tensor par"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"use_dora=true with dropout > 0 needs .*=pre"):
        check_config(_config(dropout=0.1))
    with pytest.raises(ConfigError, match=r"use_dora=true does not apply to MoE experts: set"):
        check_config(_config(target_experts=True))
    check_config(_config(dropout=0.1, dropout_position="pre"))
    # A DoRA layer built in code and handed DTensors (tensor parallel) refuses them too.
    layer = trained_dora(LoraSpec(dim=4, alpha=8, use_dora=True)).model.layers[0].mlp.up_proj
    monkeypatch.setattr(L, "_is_dtensor", lambda *tensors: True)
    with pytest.raises(ValueError, match="use_dora is not supported under tensor parallelism"):
        layer(torch.randn(2, 32))


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 2)  # router: never adapted
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.o_proj = nn.Linear(8, 8)


def test_dora_on_moe_experts_is_refused() -> None:
    with pytest.raises(ValueError, match=r"use_dora=true does not apply to MoE experts \(experts"):
        apply_lora(_Experts(), LoraSpec(use_dora=True))
    names = apply_lora(_Experts(), LoraSpec(use_dora=True, exclude_modules=["*experts.*"]))
    assert names == ["o_proj"]
    assert apply_lora(_Experts(), LoraSpec()) == ["experts.0", "experts.1", "o_proj"]


TRITON_SCRIPT = """
import torch
from torch import nn
import sftkit.model.kernels.lora as K
from sftkit.model.lora import LoraSpec, apply_lora

calls = []
fwd = K.lora_forward_add_
K.lora_forward_add_ = lambda *a, **k: calls.append(1) or fwd(*a, **k)

def run(use_triton, dropout):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(72, 136))
    apply_lora(seq, LoraSpec(dim=5, alpha=10, use_dora=True, dropout=dropout,
                             dropout_position="pre", use_triton=use_triton))
    m = seq[0].train()
    nn.init.normal_(m.lora_B.weight)
    torch.manual_seed(1)
    x = torch.randn(3, 31, 72, requires_grad=True)
    y = m(x)
    wanted = [x, m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector.weight]
    return [y, *torch.autograd.grad((y * y).sum(), wanted)]

for dropout in (0.0, 0.3):
    for r, g in zip(run(False, dropout), run(True, dropout), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)
assert len(calls) == 2, calls
print("OK")
"""


@pytest.mark.slow
def test_fused_triton_kernels_equal_the_torch_path(run_triton_interpreted) -> None:
    """DoRA keeps the fused LoRA kernels (interpreted on CPU): same values and gradients."""
    run_triton_interpreted(TRITON_SCRIPT)


def test_the_norm_reads_a_quantised_base_dequantised() -> None:
    """An NF4 base (QLoRA) enters the norm and the init dequantised; a callable works too."""
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    torch.manual_seed(0)
    w, A, B = torch.randn(40, 64), torch.randn(3, 64), torch.randn(40, 3)
    q = nf4.to_nf4(w, block_size=32, scaler_block_size=8)
    want = torch.linalg.norm(q.get_original_weight() + 2.0 * (B @ A), dim=1)
    torch.testing.assert_close(dora.weight_norm(q, A, B, 2.0), want)
    torch.testing.assert_close(dora.weight_norm(q.get_original_weight, A, B, 2.0), want)
    assert not torch.allclose(dora.weight_norm(w, A, B, 2.0), want)  # quantisation shows
