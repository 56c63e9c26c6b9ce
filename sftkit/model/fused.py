"""Fused kernels (RMSNorm, SwiGLU, RoPE) and per-layer compilation for Llama-style HF models.

`apply_fused_kernels(model)` swaps module forwards in place; parameter names, the state dict
and the maths stay the same (equal up to rounding, see the tests). Kernels come from
liger-kernel when it is importable (an optional dependency), else from sftkit's own Triton
kernels (`sftkit.model.kernels.fused_*`). Both need CUDA (or TRITON_INTERPRET=1 for tests):
on CPU the model is left as is. Patched forwards check their input's device on every call
and fall back to the original forward off CUDA, so moving the model later is safe.

Call it after the model is loaded (and after LoRA), before FSDP2; do not combine it with
`compile_layers` (Inductor fuses the same ops itself and traces the plain PyTorch code).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sftkit.model.kernels import triton_available, triton_interpreting
from sftkit.model.load import decoder_layers

logger = logging.getLogger("sftkit")

FUSED_OPS: tuple[str, ...] = ("rms_norm", "swiglu", "rope")
Backend = Literal["auto", "liger", "triton"]
# Model types whose RMSNorm, MLP and rotary embedding follow Llama's code (checked names:
# `variance_epsilon`, gate/up/down projections with silu, `apply_rotary_pos_emb(q, k, cos,
# sin)` with duplicated cos/sin halves). Gemma's norm scales by (1 + w): not listed. The MoE
# ones share that attention and those norms (their fused experts are no `*MLP` module, and
# keep HF's code); GPT-OSS, DeepSeek-V3, GLM-4.5 and Llama 4 rotate or normalise otherwise.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral",
                                   "olmoe"})  # fmt: skip
_SILU = frozenset({"silu", "swish"})
_ORIGINAL_ROPE: dict[str, Callable[..., Any]] = {}  # modeling module name -> HF function


@functools.cache
def liger_available() -> bool:
    """Whether liger-kernel can be imported (it is optional)."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_fused_backend(backend: Backend, device: torch.device) -> str | None:
    """The kernel source to use on `device`: "liger", "triton", or None (leave as is)."""
    if backend not in ("auto", "liger", "triton"):
        raise ValueError(f"unknown fused-kernel backend {backend!r}; use auto, liger or triton")
    runs = device.type == "cuda" or triton_interpreting()
    if not runs or not triton_available():
        return None
    if backend == "liger" and not liger_available():
        raise ValueError(
            "fused-kernel backend 'liger' needs liger-kernel: `pip install liger-kernel`, or "
            "use backend 'auto' (sftkit's own Triton kernels)"
        )
    if backend == "liger" or (backend == "auto" and liger_available()):
        return "liger"
    return "triton"


def _kernels(source: str) -> dict[str, Callable[..., Any]]:
    """The three fused functions from `source`, with sftkit's signatures."""
    if source == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return {
            "rms_norm": lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama"),
            "swiglu": LigerSiLUMulFunction.apply,
            "swiglu_linear": None,
            "rope": liger_rotary_pos_emb,
        }
    from sftkit.model.kernels.fused_rmsnorm import rms_norm
    from sftkit.model.kernels.fused_rope import apply_rope, rope_supported
    from sftkit.model.kernels.fused_swiglu import silu_mul, silu_mul_linear

    def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor] | None:
        return apply_rope(q, k, cos, sin) if rope_supported(q, k, cos, sin) else None

    return {"rms_norm": rms_norm, "swiglu": silu_mul, "swiglu_linear": silu_mul_linear,
            "rope": rope}  # fmt: skip


def _on_kernel_device(t: Tensor) -> bool:
    return t.is_cuda or triton_interpreting()


# ----------------------------------------------------------------------------- patching


_FUSED_CLASSES: dict[tuple[type, str], type] = {}


def _swap_class(module: nn.Module, forward: Callable[..., Any], tag: str) -> None:
    """Give `module` a subclass of its class whose forward is `forward` (names unchanged)."""
    # Forwards fall back via `_sftkit_base`, not super(type(self)): FSDP2 swaps in its own
    # subclass, for which super() would land on the fused forward again (endless recursion).
    cls = getattr(type(module), "_sftkit_base", type(module))
    key = (cls, tag)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(
            f"Fused{cls.__name__}", (cls,), {"forward": forward, "_sftkit_base": cls}
        )
    module.__class__ = _FUSED_CLASSES[key]


def _patch_rms_norms(model: nn.Module, fn: Callable[..., Tensor]) -> int:
    def forward(self: Any, hidden_states: Tensor) -> Tensor:  # an HF RMSNorm
        if not _on_kernel_device(hidden_states):
            return self._sftkit_base.forward(self, hidden_states)
        return fn(hidden_states, self.weight, self.variance_epsilon)

    count = 0
    for module in model.modules():
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        if (
            name.endswith("RMSNorm")
            and "Gemma" not in name
            and hasattr(module, "variance_epsilon")
            and isinstance(weight, nn.Parameter)
            and weight.dim() == 1
        ):
            _swap_class(module, forward, f"rms_norm:{id(fn)}")
            count += 1
    return count


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward may be bypassed: no hooks, no LoRA wrapper, no DTensor."""
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and type(weight) is nn.Parameter
        and type(weight.data) is Tensor
    )


def _patch_mlps(
    model: nn.Module,
    fn: Callable[..., Tensor],
    fn_linear: Callable[..., Tensor] | None,
    hidden_act: str | None,
) -> int:
    if hidden_act not in _SILU:
        logger.warning("Fused SwiGLU skipped: the model's hidden_act is %r, not silu", hidden_act)
        return 0

    def forward(self: Any, x: Tensor) -> Tensor:  # an HF gated MLP
        if not _on_kernel_device(x):
            return self._sftkit_base.forward(self, x)
        gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
        if fn_linear is not None and _plain_linear(down):
            # down_proj's input is recomputed in backward instead of saved.
            return fn_linear(gate, up, down.weight, down.bias)
        return down(fn(gate, up))

    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("MLP") and all(
            isinstance(getattr(module, n, None), nn.Module)
            for n in ("gate_proj", "up_proj", "down_proj")
        ):
            _swap_class(module, forward, f"swiglu:{id(fn)}")
            count += 1
    return count


def _patch_rope(model: nn.Module, fn: Callable[..., Any]) -> int:
    """Replace `apply_rotary_pos_emb` in the modeling modules of the model's attention layers.

    HF attention forwards look the function up in their module's globals, so this is a
    module-level patch (as liger-kernel does): it affects every model of that architecture
    in the process, which is safe because the replacement computes the same values and
    falls back to HF's function for other devices, shapes or arguments.
    """
    modules = {
        type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")
    }
    count = 0
    for name in sorted(modules):
        mod = sys.modules.get(name)
        original = _ORIGINAL_ROPE.get(name) or getattr(mod, "apply_rotary_pos_emb", None)
        if mod is None or original is None:
            continue
        _ORIGINAL_ROPE[name] = original

        def fused(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any,
                  _orig: Callable[..., Any] = original, **kwargs: Any) -> Any:  # fmt: skip
            plain = (
                not args
                and kwargs.get("unsqueeze_dim", 1) == 1
                and set(kwargs) <= {"unsqueeze_dim"}
            )
            if plain and _on_kernel_device(q):
                out = fn(q, k, cos, sin)
                if out is not None:
                    return out
            return _orig(q, k, cos, sin, *args, **kwargs)

        mod.apply_rotary_pos_emb = fused  # type: ignore[attr-defined]
        count += 1
    return count


def restore_rope() -> None:
    """Undo `_patch_rope` for every modeling module (tests, or to compare against HF)."""
    for name, original in _ORIGINAL_ROPE.items():
        if name in sys.modules:
            sys.modules[name].apply_rotary_pos_emb = original  # type: ignore[attr-defined]


def _check_enabled(enabled: set[str] | None) -> set[str]:
    ops = set(FUSED_OPS) if enabled is None else set(enabled)
    unknown = ops - set(FUSED_OPS)
    if unknown:
        raise ValueError(
            f"unknown fused kernel(s) {sorted(unknown)}; choose from {', '.join(FUSED_OPS)}"
        )
    return ops


def apply_fused_kernels(
    model: nn.Module,
    enabled: set[str] | None = None,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
) -> list[str]:
    """Swap in fused RMSNorm / SwiGLU / RoPE forwards; returns the ops applied, in order.

    `enabled` picks ops from `FUSED_OPS` (None: all). `backend` "auto" uses liger-kernel when
    importable, else sftkit's Triton kernels; on CPU (no TRITON_INTERPRET) nothing is
    applied and [] is returned. Models outside `SUPPORTED_MODEL_TYPES` are left as is with
    a warning. `device` is where the model will run (default: its first parameter's device),
    so this can run before the model is moved, e.g. right after LoRA in the transform order.
    """
    ops = _check_enabled(enabled)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        logger.warning(
            "Fused kernels skipped: model_type %r is not one of %s",
            model_type, ", ".join(sorted(SUPPORTED_MODEL_TYPES)),
        )  # fmt: skip
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    source = resolve_fused_backend(backend, device)
    if source is None:
        logger.info("Fused kernels skipped: they need CUDA and Triton (model is on %s)", device)
        return []
    fns = _kernels(source)
    applied = []
    if "rms_norm" in ops and _patch_rms_norms(model, fns["rms_norm"]):
        applied.append("rms_norm")
    if "swiglu" in ops and _patch_mlps(
        model, fns["swiglu"], fns["swiglu_linear"], getattr(config, "hidden_act", None)
    ):
        applied.append("swiglu")
    if "rope" in ops and _patch_rope(model, fns["rope"]):
        applied.append("rope")
    logger.info("Fused kernels (%s): %s", source, ", ".join(applied) or "none")
    return applied


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`: names unchanged).

    Per-layer compilation compiles one layer graph, reused by all layers, and keeps the
    loss and the optimizer outside the graph. Returns the number of layers compiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)
