"""FP8 through torchao (emulated on CPU): which linear layers convert, that training runs
and stays close to bf16, and how NeMo RL's fp8_cfg maps or is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.config.errors import ConfigError
from sftkit.config.load import load_config
from sftkit.model.lora import LoraSpec, apply_lora

torchao = pytest.importorskip("torchao")
from torchao.float8.config import ScalingGranularity, e4m3_dtype, e5m2_dtype  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from sftkit.model.fp8 import apply_fp8, torchao_config  # noqa: E402

CPU = torch.device("cpu")


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def fp8_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]


def test_every_decoder_linear_runs_in_fp8_and_the_head_stays() -> None:
    model = tiny_llama(layers=2)
    report = apply_fp8(model, "tensorwise", "hybrid", CPU)
    # 7 linear layers per decoder layer (q, k, v, o, gate, up, down); the head stays.
    assert len(fp8_layers(model)) == 14 == len(report.converted)
    assert sorted(fp8_layers(model)) == sorted(report.converted)
    assert report.left == {"lm_head": "head (the chunked loss reads its weight)"}
    assert report.emulated


def test_lora_layers_and_odd_shapes_stay_in_bf16() -> None:
    model = tiny_llama(layers=2)
    apply_lora(
        model, LoraSpec(target_modules=["q_proj", "v_proj"], match_all_linear=False, dim=4, alpha=8)
    )
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 72)  # 72 % 16 != 0
    report = apply_fp8(model, "rowwise", "e4m3", CPU)
    assert len(fp8_layers(model)) == 14 - 4 - 1
    assert sum("LoRA" in r for r in report.left.values()) == 4
    assert "multiples of 16" in report.left["model.layers.1.mlp.down_proj"]
    assert hasattr(model.model.layers[0].self_attn.q_proj, "lora_A")  # LoRA kept


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_tracks_bf16(recipe: str, one_thread: None) -> None:
    bf16 = tiny_llama(layers=2)
    fp8 = copy.deepcopy(bf16)
    apply_fp8(fp8, recipe, "hybrid", CPU)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, model in (("bf16", bf16), ("fp8", fp8)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(8):
            loss = _loss(model, ids)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads)
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    # Measured: within 1e-4 relative at the first step, 2e-3 after 8 (FP8 does quantize:
    # the losses are not equal).
    assert losses["fp8"] != losses["bf16"]
    assert abs(losses["fp8"][0] - losses["bf16"][0]) < 0.002 * losses["bf16"][0]
    assert losses["fp8"][-1] < losses["fp8"][0] - 0.5  # it learns (memorises the batch)
    assert abs(losses["fp8"][-1] - losses["bf16"][-1]) < 0.01 * losses["bf16"][-1]
    # the state dict is the plain model's: checkpoints and exports are unchanged
    assert fp8.state_dict().keys() == bf16.state_dict().keys()


def test_nemo_fp8_spellings_map_to_torchao() -> None:
    hybrid = torchao_config("tensorwise", "hybrid", emulate=True)
    assert hybrid.cast_config_grad_output.target_dtype == e5m2_dtype
    assert torchao_config("tensorwise", "e4m3", True).cast_config_grad_output.target_dtype == (
        e4m3_dtype
    )
    rows = torchao_config("rowwise", "e4m3", True)
    assert rows.cast_config_weight.scaling_granularity == ScalingGranularity.AXISWISE
    assert torchao_config("rowwise_with_gw_hp", "e4m3", True).emulate


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fp8_recipe=blockwise"], "'tensorwise', 'rowwise'"),
        (["fp8=e5m2"], "fp8 is 'e5m2'"),
        (["fp8_param=true"], "fp8_param"),
    ],
)
def test_unsupported_fp8_settings_are_config_errors(overrides: list[str], message: str) -> None:
    keys = ["enabled=true", *overrides]
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [f"policy.dtensor_cfg.fp8_cfg.{k}" for k in keys])
    assert "policy.dtensor_cfg.fp8_cfg" in str(err.value)


def test_megatron_fp8_cfg_is_read_and_its_blockwise_default_refused() -> None:
    megatron = ["policy.megatron_cfg.enabled=true", "policy.megatron_cfg.fp8_cfg.enabled=true"]
    with pytest.raises(ConfigError, match="policy.megatron_cfg.fp8_cfg.fp8_recipe is 'blockwise'"):
        load_config(None, megatron)
    cfg = load_config(None, [*megatron, "policy.megatron_cfg.fp8_cfg.fp8_recipe=tensorwise"])
    assert cfg.policy.dtensor_cfg.fp8_cfg.enabled
    assert cfg.policy.dtensor_cfg.fp8_cfg.fp8 == "e4m3"  # Megatron's default: e4m3 throughout
    assert load_config(None, []).policy.dtensor_cfg.fp8_cfg.fp8_recipe == "tensorwise"
