"""LoRA on MoE experts: a low-rank delta on each expert's slice of the fused 3-D weights.

transformers 5 stores an MoE block's experts as 3-D parameters of one `*Experts` module
(Qwen3-MoE: `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], each expert's slice a
linear weight [out, in]; gpt-oss has `is_transposed`: [E, in, out]). `lora_cfg.target_experts`
gives each such parameter W a per-expert A [E, r, in] and B [E, out, r] (fp32, `lora_A` /
`lora_B` `ParameterDict`s of the experts module, keyed by the parameter's name), and every
forward of the module reads W + scale * B @ A instead of W (one `baddbmm`, as PEFT's
`ParamWrapper` does). The delta is swapped in by a forward pre-hook and swapped out by an
always-called forward hook, so it composes with whatever computes the experts
(transformers' eager loop, `grouped_mm`, `batched_mm`, or an expert-parallel module) as
long as that reads the weights from the module. A and B have the experts on dim 0 like W,
so FSDP2 and an expert slice shard them the way they shard W.

The adapter is exported as PEFT (>= 0.17) stores it for `target_parameters`: nested
`ParamWrapper`s, the first registered parameter innermost (`experts.base_layer.lora_A`),
A as [E * r, in] and B as [out, r * E] (rank-major columns). Dropout has no meaning on a
weight delta; PEFT refuses it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_STATE = "_sftkit_expert_lora"  # the ExpertLoraState attribute of an adapted experts module


class ExpertLoraState:
    """What the hooks of one adapted experts module need (a plain attribute, not a module)."""

    def __init__(self, params: list[str], scale: float, transposed: bool) -> None:
        self.params = params  # adapted parameter names, in the module's registration order
        self.scale = scale
        self.transposed = transposed  # stored [E, in, out] (gpt-oss) instead of [E, out, in]
        self.saved: list[dict[str, Any]] = []  # the base weights while a forward runs
        self.handles: list[Any] = []


def expert_weight_params(module: nn.Module) -> list[str]:
    """The fused 3-D expert weights of an `*Experts` module ([E, ., .]), in registration
    order; [] for any other module (biases, routers and dense layers are never adapted)."""
    if not type(module).__name__.endswith("Experts"):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every MoE experts module of `model` with fused 3-D weights, by module name."""
    return {n: m for n, m in model.named_modules() if expert_weight_params(m)}


def adapted_expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The experts modules that carry expert LoRA, by module name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, _STATE)}


def adapted_params(module: nn.Module) -> list[str]:
    """The names of an adapted experts module's weights that carry LoRA."""
    state: ExpertLoraState = getattr(module, _STATE)
    return state.params


def lora_pair(module: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B) of weight `name` of an adapted experts module."""
    lora_A = cast(nn.ParameterDict, module.lora_A)
    lora_B = cast(nn.ParameterDict, module.lora_B)
    return lora_A[name], lora_B[name]


def _in_out(module: nn.Module, shape: torch.Size) -> tuple[int, int]:
    # PEFT's rule (`ParamWrapper._get_in_out_features`): [E, out, in] unless `is_transposed`.
    transposed = bool(getattr(module, "is_transposed", False))
    return (shape[1], shape[2]) if transposed else (shape[2], shape[1])


def effective_weight(weight: Tensor, A: Tensor, B: Tensor, scale: float,
                     transposed: bool) -> Tensor:  # fmt: skip
    """W + scale * B @ A per expert (W^T's layout when `transposed`), in W's dtype."""
    dtype = weight.dtype
    if torch.is_autocast_enabled(weight.device.type):
        dtype = torch.get_autocast_dtype(weight.device.type)
    A, B = A.to(dtype), B.to(dtype)
    if transposed:
        return torch.baddbmm(weight.to(dtype), A.transpose(1, 2), B.transpose(1, 2), alpha=scale)
    return torch.baddbmm(weight.to(dtype), B, A, alpha=scale)


def _swap_in(module: nn.Module, args: Any) -> None:
    state: ExpertLoraState = getattr(module, _STATE)
    saved = {name: module._parameters[name] for name in state.params}
    state.saved.append(saved)
    for name, weight in saved.items():
        assert weight is not None
        A, B = lora_pair(module, name)
        # A plain tensor in `_parameters` is what attribute access returns for this forward;
        # FSDP2 swaps its own (unsharded) parameters the same way, before this hook runs.
        delta = effective_weight(weight, A, B, state.scale, state.transposed)
        module._parameters[name] = delta  # type: ignore[assignment]


def _swap_out(module: nn.Module, args: Any, output: Any) -> None:
    state: ExpertLoraState = getattr(module, _STATE)
    if state.saved:
        module._parameters.update(state.saved.pop())


def init_expert_lora_values(A: Tensor, init: str) -> None:
    """Per expert: A as `nn.init.xavier_normal_` / `kaiming_uniform_(a=sqrt 5)` would draw it
    for one [r, in] matrix (one draw for all experts)."""
    r, fan_in = A.shape[1], A.shape[2]
    with torch.no_grad():
        if init == "xavier":
            A.normal_(0.0, math.sqrt(2.0 / (r + fan_in)))
        else:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming uniform with a = sqrt(5)
            A.uniform_(-bound, bound)


def apply_expert_lora(model: nn.Module, dim: int, alpha: float, init: str, dtype: torch.dtype,
                      excluded: Callable[[str], bool] = lambda _: False) -> list[str]:  # fmt: skip
    """Adapt every experts module's fused weights in place (not those `excluded` names);
    return the adapted module names. Draws A from the CPU RNG unless on the meta device
    (`sftkit.model.parallel.init_lora_sharded` fills it later). Requires grad is left to
    the caller."""
    names = [n for n in expert_modules(model) if not excluded(n)]
    if not names:
        raise ValueError(
            f"lora_cfg.target_experts: {type(model).__name__} has no MoE experts module with "
            "fused 3-D weights (transformers 5 `*Experts`); set target_experts=false."
        )
    for name in names:
        module = model.get_submodule(name)
        params = expert_weight_params(module)
        lora_A, lora_B = nn.ParameterDict(), nn.ParameterDict()
        for pname in params:
            weight = module._parameters[pname]
            assert weight is not None
            n_exp, (fan_in, fan_out) = weight.shape[0], _in_out(module, weight.shape)
            dev = weight.device
            A = torch.empty(n_exp, dim, fan_in, device=dev, dtype=dtype)
            B = torch.zeros(n_exp, fan_out, dim, device=dev, dtype=dtype)
            if dev.type != "meta":
                init_expert_lora_values(A, init)
            lora_A[pname], lora_B[pname] = nn.Parameter(A), nn.Parameter(B)
        module.lora_A, module.lora_B = lora_A, lora_B
        transposed = bool(getattr(module, "is_transposed", False))
        state = ExpertLoraState(params, alpha / dim, transposed)
        state.handles = [
            module.register_forward_pre_hook(_swap_in),
            module.register_forward_hook(_swap_out, always_call=True),
        ]
        setattr(module, _STATE, state)
    return names


def reset_expert_lora(model: nn.Module, init: str) -> None:
    """Initialise every expert LoRA (A per `init`, B = 0)."""
    for module in adapted_expert_modules(model).values():
        for pname in getattr(module, _STATE).params:
            A, B = lora_pair(module, pname)
            init_expert_lora_values(A, init)
            with torch.no_grad():
                B.zero_()


# --------------------------------------------------------------------------- PEFT format


def peft_keys(name: str, params: list[str]) -> dict[str, str]:
    """Parameter -> PEFT module path of its `ParamWrapper`: the first registered parameter is
    wrapped first, so it sits deepest (`experts.base_layer.base_layer...`)."""
    depth = len(params)
    return {p: name + ".base_layer" * (depth - 1 - i) for i, p in enumerate(params)}


def to_peft(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A [E, r, in], B [E, out, r] -> PEFT's lora_A [E * r, in] and lora_B [out, r * E]."""
    n_exp, r, fan_in = A.shape
    return A.reshape(n_exp * r, fan_in), B.permute(1, 2, 0).reshape(B.shape[1], r * n_exp)


def from_peft(a: Tensor, b: Tensor, n_exp: int) -> tuple[Tensor, Tensor]:
    """The inverse of `to_peft`."""
    r = a.shape[0] // n_exp
    return a.reshape(n_exp, r, a.shape[1]), b.reshape(b.shape[0], r, n_exp).permute(2, 0, 1)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def expert_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Expert adapters under PEFT's names (collective under FSDP2: shards are gathered)."""
    out: dict[str, Tensor] = {}
    for name, module in adapted_expert_modules(model).items():
        params = getattr(module, _STATE).params
        for pname, path in peft_keys(name, params).items():
            A, B = lora_pair(module, pname)
            a, b = to_peft(_full(A).detach(), _full(B).detach())
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    return out


def load_expert_lora_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy PEFT-named expert adapters (keys as `expert_lora_state_dict`) into the model."""
    with torch.no_grad():
        for name, module in adapted_expert_modules(model).items():
            params = getattr(module, _STATE).params
            for pname, path in peft_keys(name, params).items():
                A, B = lora_pair(module, pname)
                a, b = from_peft(sd[f"{PEFT_PREFIX}{path}.lora_A.weight"],
                                 sd[f"{PEFT_PREFIX}{path}.lora_B.weight"], A.shape[0])  # fmt: skip
                if a.shape != A.shape or b.shape != B.shape:
                    raise ValueError(f"expert LoRA {name}.{pname}: shapes {tuple(a.shape)}, "
                                     f"{tuple(b.shape)} do not fit {tuple(A.shape)}, "
                                     f"{tuple(B.shape)}; rank differs?")  # fmt: skip
                A.copy_(a)
                B.copy_(b)


def peft_target_parameters(model: nn.Module) -> list[str]:
    """`target_parameters` for adapter_config.json: `<module leaf>.<param>` when those select
    exactly the adapted weights (PEFT matches dotted suffixes), else full names."""
    adapted = {f"{n}.{p}" for n, m in adapted_expert_modules(model).items()
               for p in getattr(m, _STATE).params}  # fmt: skip
    short = sorted({_leaf(k) for k in adapted})
    every = {f"{n}.{p}" for n, m in expert_modules(model).items() for p in expert_weight_params(m)}
    if {k for k in every if _leaf(k) in short} == adapted:
        return short
    return sorted(adapted)


def _leaf(key: str) -> str:
    return ".".join(key.rsplit(".", 2)[-2:])  # "experts.gate_up_proj"


# --------------------------------------------------------------------------- merge


def merge_expert_lora(model: nn.Module) -> None:
    """In place: W += scale * B @ A per expert, then drop the adapters and their hooks."""
    for module in adapted_expert_modules(model).values():
        state: ExpertLoraState = getattr(module, _STATE)
        with torch.no_grad():
            for pname in state.params:
                w = module._parameters[pname]
                assert w is not None
                A, B = lora_pair(module, pname)
                merged = effective_weight(w.float(), A.float(), B.float(), state.scale,
                                          state.transposed)  # fmt: skip
                w.copy_(merged.to(w.dtype))
        for handle in state.handles:
            handle.remove()
        del module.lora_A, module.lora_B
        delattr(module, _STATE)


def merge_expert_lora_state(model: nn.Module, state: dict[str, Tensor], merge: bool) -> None:
    """In a full (gathered) model state dict: pop the expert adapters, merging them into
    their weights when `merge`."""
    for name, module in adapted_expert_modules(model).items():
        lora: ExpertLoraState = getattr(module, _STATE)
        for pname in lora.params:
            a, b = state.pop(f"{name}.lora_A.{pname}"), state.pop(f"{name}.lora_B.{pname}")
            if merge:
                w = state[f"{name}.{pname}"]
                merged = effective_weight(w.float(), a.float(), b.float(), lora.scale,
                                          lora.transposed)  # fmt: skip
                state[f"{name}.{pname}"] = merged.to(w.dtype)
