"""FP8 training of the linear layers through torchao's float8 (opt-in, torchao is optional).

`policy.dtensor_cfg.fp8_cfg` uses NeMo RL's `fp8_cfg` spelling (Megatron's, which
`megatron_cfg.fp8_cfg` feeds when `megatron_cfg.enabled`): `fp8_recipe` picks torchao's
scaling (`tensorwise`: one dynamic scale per tensor; `rowwise`: one per row, scales rounded
to powers of 2; `rowwise_with_gw_hp`: rowwise with the weight gradient in high precision),
`fp8` the gradient format (`hybrid`: e4m3 forward, e5m2 gradients; `e4m3`: e4m3 everywhere).
Megatron's `blockwise`, `delayed` and `mxfp8` have no torchao float8 equivalent: a config
error (`sftkit.config.checks.fp8_config_error`).

Which `nn.Linear` layers run in FP8, and which stay in the compute dtype (logged, one line):
- the head stays: the chunked loss multiplies by its weight directly (`sftkit.train.loss`);
- LoRA-adapted layers stay: their forward is sftkit's LoRA Function, not nn.Linear's;
- layers whose dimensions are not multiples of 16 stay (FP8 GEMMs need them);
- every other linear (attention q/k/v/o, MLP gate/up/down) runs in FP8. The fused
  SwiGLU+down kernel (`sftkit.model.fused`) only takes a plain nn.Linear, so with FP8 the
  down projection is an FP8 GEMM after the fused SwiGLU instead.

Off CUDA, or on a GPU without FP8 tensor cores (compute capability < 8.9), torchao's
emulation runs the same casts and scales with float32 matmuls (tests; no speed-up). FP8
pays off with `policy.dtensor_cfg.compile=true`, which fuses the scale and cast passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("sftkit")

_FP8_MIN_CAPABILITY = (8, 9)  # Ada/Hopper: the first GPUs with FP8 tensor cores


@dataclass
class Fp8Report:
    """What `apply_fp8` did: FP8 layer names, and layers left in bf16 with the reason."""

    converted: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    emulated: bool = False


def torchao_config(recipe: str, fp8: str, emulate: bool) -> Any:
    """torchao's `Float8LinearConfig` for a NeMo RL (`fp8_recipe`, `fp8`) pair."""
    import dataclasses

    from torchao.float8 import CastConfig, Float8LinearConfig, ScalingGranularity
    from torchao.float8.config import e4m3_dtype, e5m2_dtype

    grad = e5m2_dtype if fp8 == "hybrid" else e4m3_dtype
    if recipe == "tensorwise":
        return Float8LinearConfig(
            cast_config_grad_output=CastConfig(target_dtype=grad), emulate=emulate
        )
    if recipe == "rowwise":  # torchao's ROWWISE recipe, with the gradient format chosen

        def rows(dtype: torch.dtype) -> Any:
            return CastConfig(scaling_granularity=ScalingGranularity.AXISWISE, target_dtype=dtype)

        return Float8LinearConfig(
            cast_config_input=rows(e4m3_dtype),
            cast_config_weight=rows(e4m3_dtype),
            cast_config_grad_output=rows(grad),
            round_scales_to_power_of_2=True,
            emulate=emulate,
        )
    base = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(base, emulate=emulate)


def _head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def fp8_blocker(name: str, module: nn.Module, heads: set[str]) -> str | None:
    """Why the linear layer `name` stays in the compute dtype, or None when it can be FP8."""
    if name in heads:
        return "head (the chunked loss reads its weight)"
    if hasattr(module, "lora_A"):
        return "LoRA-adapted (sftkit's LoRA function)"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__}, not a plain nn.Linear"
    if module.in_features % 16 or module.out_features % 16:
        return f"{module.in_features}x{module.out_features} (FP8 GEMMs need multiples of 16)"
    return None


def needs_emulation(device: torch.device) -> bool:
    """Whether FP8 GEMMs must be emulated on `device` (no FP8 tensor cores there)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) < _FP8_MIN_CAPABILITY


def apply_fp8(
    model: nn.Module, recipe: str, fp8: str, device: torch.device, emulate: bool | None = None
) -> Fp8Report:
    """Swap the eligible `nn.Linear` layers for torchao's `Float8Linear` (in place; names,
    parameters and state dict unchanged). Call after LoRA and before TP/compile/FSDP2."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ValueError(
            "policy.dtensor_cfg.fp8_cfg.enabled needs torchao: `pip install torchao` (or "
            f"`pip install sftkit[fp8]`), or set fp8_cfg.enabled=false ({err})"
        ) from err
    report = Fp8Report(emulated=needs_emulation(device) if emulate is None else emulate)
    heads = _head_names(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = fp8_blocker(name, module, heads)
            if reason is None:
                report.converted.append(name)
            else:
                report.left[name] = reason
    chosen = set(report.converted)
    convert_to_float8_training(
        model,
        module_filter_fn=lambda _module, fqn: fqn in chosen,
        config=torchao_config(recipe, fp8, report.emulated),
    )
    kinds = sorted({reason for reason in report.left.values()})
    logger.info(
        "FP8 (torchao %s, %s%s): %d linear layers; %d left in the compute dtype%s",
        recipe,
        fp8,
        ", emulated: no FP8 tensor cores here" if report.emulated else "",
        len(report.converted),
        len(report.left),
        f" ({'; '.join(kinds)})" if kinds else "",
    )
    return report
