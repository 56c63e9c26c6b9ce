"""DoRA (weight-decomposed LoRA, PEFT's `use_dora`) on sftkit's LoRA layers.

An adapted layer with DoRA computes, as PEFT 0.21 does (`peft/tuners/lora/dora.py`):

    n = ||W + s B A||  per output row, detached (no gradient: DoRA paper section 4.3)
    y = (m / n) * (x W^T + s (x A^T) B^T) + b

with the magnitude `m` (one value per output row, trainable, initialised to n, so the first
forward equals the base model). With LoRA dropout (PEFT's, on the LoRA input x'):
`y = x W^T + b + (m/n - 1) x' W^T + (m/n) s (x' A^T) B^T`. The LoRA part runs through
`LoraLinearFunction`, so the fused Triton kernels still apply; the DoRA rescale is plain
autograd around it (it keeps one more [tokens, out] tensor per layer for m's gradient).

Layers are typed `Any` here: `sftkit.model.lora` imports this module (no cycle back).
The base weight enters only as a tensor or a callable returning the dense weight, so a
quantised base (NF4) passes its dequantisation. `lora_magnitude_vector` is PEFT's name:
the adapter file and `final_hf` (merged: W' = (m / n) (W + s B A)) load in PEFT/transformers
with the same logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAGNITUDE = "lora_magnitude_vector"  # PEFT's attribute and state-dict name
WeightSource = Tensor | Callable[[], Tensor]  # a dense weight, or how to make one (NF4)


class DoraMagnitude(nn.Module):
    """Holds m as `weight` [out_features] (PEFT: `lora_magnitude_vector.<adapter>.weight`).

    Built with `torch.empty` (no RNG draw), so `init_lora_sharded`'s replay of the LoRA init
    draws stays aligned; `init_magnitude` fills it."""

    def __init__(self, out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))


def dense(weight: WeightSource) -> Tensor:
    """The base weight as a plain [out, in] tensor: a callable's result, a torchao
    NF4Tensor dequantised (`.to` its own dtype; known by name: torchao stays optional)."""
    if callable(weight):
        return weight()
    return weight.to(weight.dtype) if type(weight).__name__ == "NF4Tensor" else weight


def weight_norm(weight: WeightSource, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """||W + scale * B @ A|| per output row in W's dtype, without gradient (PEFT detaches
    both the LoRA weight and the norm)."""
    with torch.no_grad():
        w = dense(weight)
        delta = (B.detach() @ A.detach()).to(w.dtype)
        return torch.linalg.norm(w + scale * delta, dim=1).to(w.dtype)


def has_dora(module: nn.Module) -> bool:
    return isinstance(getattr(module, MAGNITUDE, None), DoraMagnitude)


def magnitude(module: nn.Module) -> Tensor:
    """The layer's m parameter."""
    return getattr(module, MAGNITUDE).weight


def add_magnitude(module: Any, dtype: torch.dtype) -> None:
    """Give an adapted layer its magnitude vector (uninitialised: see `init_magnitude`)."""
    setattr(module, MAGNITUDE, DoraMagnitude(module.out_features, module.weight.device, dtype))


def init_magnitude(module: Any, weight: WeightSource | None = None) -> None:
    """m = ||W + s B A|| per row (PEFT's init); `weight` overrides `module.weight` (NF4)."""
    mag = magnitude(module)
    base = module.weight if weight is None else weight
    norm = weight_norm(base, module.lora_A.weight, module.lora_B.weight, module.lora_scale)
    with torch.no_grad():
        mag.copy_(norm.to(mag.dtype))


@torch.no_grad()
def init_magnitudes_sharded(model: nn.Module) -> None:
    """`init_magnitude` on FSDP2 shards, just after `init_lora_sharded` zeroed B: then
    n = ||W|| per row, and FSDP2 splits W [out, in] and m [out] over the same rows (dim 0),
    so each rank fills its block of m from its rows of W, without a gather."""
    for name, module in model.named_modules():
        if not has_dora(module):
            continue
        mag = magnitude(module)
        local_m, local_w = _local(mag), _local(module.weight)
        if local_m.shape[0] != local_w.shape[0] or _local(module.lora_B.weight).any():
            raise AssertionError(f"{name}: DoRA magnitude shard does not match its weight rows")
        local_m.copy_(torch.linalg.norm(dense(local_w), dim=1).to(local_m.dtype))  # NF4 too


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def dora_forward(module: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor,
                 B: Tensor, dropout_active: bool, lora_fn: Callable[..., Tensor]) -> Tensor:  # fmt: skip
    """The DoRA layer output for 2-D x, all operands already in the compute dtype;
    `lora_fn` is `LoraLinearFunction.apply` (the fused LoRA path)."""
    scale, triton = module.lora_scale, module.lora_use_triton
    w = dense(weight)  # `weight` may be quantised; the function below keeps it so
    ratio = magnitude(module).to(x.dtype) / weight_norm(w, A, B, scale)  # gradient to m only
    if dropout_active:  # PEFT: the base term and the LoRA branch both see dropout(x)
        xd = module.lora_dropout(x)
        branch = lora_fn(xd, None, None, None, A, B, scale, triton)
        return F.linear(x, w, bias) + (ratio - 1) * F.linear(xd, w) + ratio * branch
    y = lora_fn(x, weight, None, None, A, B, scale, triton)
    out = y * ratio
    return out if bias is None else out + bias


def merged_weight(weight: WeightSource, A: Tensor, B: Tensor, scale: float,
                  magnitude: Tensor) -> Tensor:  # fmt: skip
    """W' = (m / n) (W + s B A) in float32 (PEFT's merge), for `final_hf`."""
    w = dense(weight).float()
    merged = w + scale * (B.float() @ A.float())
    norm = torch.linalg.norm(merged, dim=1)
    return (magnitude.float() / norm).unsqueeze(1) * merged


def refuse_experts(names: list[str], what: str = "use_dora") -> None:
    """DoRA on MoE experts is not implemented (PEFT has no DoRA for fused experts either):
    one line naming the first expert layer and the fix."""
    experts = [n for n in names if "experts" in n.split(".")]
    if experts:
        raise ValueError(
            f"policy.dtensor_cfg.lora_cfg.{what}=true does not apply to MoE experts "
            f"({experts[0]} and {len(experts) - 1} more): add '*.experts.*' to "
            "lora_cfg.exclude_modules, or set use_dora=false."
        )
