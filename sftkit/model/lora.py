"""LoRA: low-rank adapters injected in place into a Hugging Face model's linear layers.

Semantics follow NeMo Automodel's LoRA (`nemo_automodel/components/_peft/lora.py`: scale
alpha/dim, A xavier-normal or kaiming-uniform, B = 0, dropout "post" on the branch) except where
the seed spec says otherwise: `match_all_linear` overrides `target_modules` (with a warning),
and bare names such as `q_proj` match `model.layers.0.self_attn.q_proj` (PEFT's rule).

An adapted `nn.Linear` keeps its class's behaviour and parameter names (`weight`, `bias`);
its class is swapped for a subclass that adds `lora_A` (Linear in -> r) and `lora_B`
(Linear r -> out), so state dicts, HF `save_pretrained` and PEFT key names all line up.
The forward is one memory-efficient autograd Function that saves x, A and B but never x @ A^T
(recomputed in backward), with fused Triton kernels on CUDA when `use_triton` is set.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftkit.model import dora, lora_experts
from sftkit.model.load import DTYPES, lora_unsafe_leaves, moe_routers

if TYPE_CHECKING:
    from sftkit.config.schema import PolicyConfig

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SFTKIT_LORA_CONFIG = "sftkit_lora_config.json"


@dataclass
class LoraSpec:
    """What to adapt and how; built from the config by `lora_spec_from_config`. The config's
    values are checked at load (`sftkit.config.checks`); these checks guard specs built in
    code."""

    target_modules: list[str] = field(default_factory=list)  # names or wildcards to adapt
    exclude_modules: list[str] = field(default_factory=list)  # names or wildcards to skip
    match_all_linear: bool = True  # adapt every linear layer (overrides target_modules)
    dim: int = 8  # rank r
    alpha: float = 32.0  # scale = alpha / dim
    dropout: float = 0.0  # dropout probability on the LoRA branch only
    dropout_position: Literal["pre", "post"] = "post"  # on the LoRA input | on its output
    lora_A_init: Literal["xavier", "uniform"] = "xavier"  # xavier normal | kaiming uniform
    use_triton: bool = True  # fused Triton kernels on CUDA (never under tensor parallelism)
    lora_dtype: torch.dtype = torch.float32  # adapter parameter dtype (uniform for FSDP)
    target_experts: bool = False  # also MoE experts' fused 3-D weights (`lora_experts`)
    use_dora: bool = False  # DoRA: a trained magnitude per output row (`sftkit.model.dora`)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"LoRA dim must be >= 1, got {self.dim}; set lora_cfg.dim to e.g. 8.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if self.dropout_position not in ("pre", "post"):
            raise ValueError(
                f"LoRA dropout_position must be 'pre' or 'post', got {self.dropout_position!r}."
            )
        if self.lora_A_init not in ("xavier", "uniform"):
            raise ValueError(
                f"LoRA lora_A_init must be 'xavier' (normal) or 'uniform' (kaiming), "
                f"got {self.lora_A_init!r}."
            )
        if self.target_experts and self.dropout > 0:
            raise ValueError(
                "LoRA on experts is a weight delta, where dropout has no meaning (PEFT refuses "
                "it too): set lora_cfg.dropout=0 or lora_cfg.target_experts=false."
            )
        if self.use_dora and self.dropout > 0 and self.dropout_position == "post":
            raise ValueError(
                "LoRA use_dora with dropout > 0 needs dropout_position 'pre' (PEFT's DoRA drops "
                "the LoRA input; 'post' has no DoRA form); set lora_cfg.dropout_position=pre."
            )
        if self.use_dora and self.target_experts:
            raise ValueError(
                "LoRA use_dora does not apply to MoE experts' fused weights: set "
                "lora_cfg.target_experts=false or use_dora=false."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.dim


# --------------------------------------------------------------------------- config


def lora_spec_from_config(policy_cfg: PolicyConfig) -> LoraSpec | None:
    """The LoRA spec of `policy.dtensor_cfg.lora_cfg`, None if off. That section is the
    effective LoRA, derived once at load: Megatron's `peft` is translated into it
    (`sftkit.config.compat`), `use_triton` is off under tensor parallelism."""
    lcfg = policy_cfg.dtensor_cfg.lora_cfg
    if not lcfg.enabled:
        return None
    return LoraSpec(
        target_modules=list(lcfg.target_modules),
        exclude_modules=list(lcfg.exclude_modules),
        match_all_linear=bool(lcfg.match_all_linear),
        dim=int(lcfg.dim),
        alpha=float(lcfg.alpha),
        dropout=float(lcfg.dropout),
        dropout_position=lcfg.dropout_position,  # type: ignore[arg-type]
        lora_A_init=lcfg.lora_A_init,  # type: ignore[arg-type]
        use_triton=bool(lcfg.use_triton),
        lora_dtype=DTYPES[lcfg.lora_dtype],
        target_experts=bool(lcfg.target_experts),
        use_dora=bool(lcfg.use_dora),
    )


# --------------------------------------------------------------------------- matching


def pattern_matches(pattern: str, name: str) -> bool:
    """True when `pattern` (fnmatch wildcards) matches `name` or a dotted suffix of it.

    `q_proj`, `self_attn.q_proj` and `*.layers.0.*.q_proj` all match
    `model.layers.0.self_attn.q_proj`; `q_proj` does not match `model.xq_proj`.
    """
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 style linear layer, weight stored [in, out])."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def select_lora_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Names of the linear layers `spec` adapts, in module order; warns on unused patterns.

    MoE routers (`moe_routers`) are never adapted. A transformers `Conv1D` layer (GPT-2
    style) that the spec would adapt is an error: its transposed weight is not handled by
    the LoRA forward, merge and export here."""
    skip = moe_routers(model)
    unsafe = lora_unsafe_leaves(model) if spec.match_all_linear else set()
    skip |= {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in unsafe}
    if skip:
        logger.info("lora: never MoE routers, nor %s (lora_unsafe_leaves)", sorted(unsafe))
    layers = [(n, isinstance(m, nn.Linear)) for n, m in model.named_modules()
              if n and n not in skip and (isinstance(m, nn.Linear) or _is_conv1d(m))]  # fmt: skip
    linear = [n for n, is_linear in layers if is_linear]
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    output_names = {n for n, m in model.named_modules() if out_emb is not None and m is out_emb}
    if spec.match_all_linear and spec.target_modules:
        logger.warning("lora: match_all_linear=true overrides target_modules %s; set "
                       "match_all_linear=false to use the list.", spec.target_modules)  # fmt: skip
    use_targets = bool(spec.target_modules) and not spec.match_all_linear
    if not spec.match_all_linear and not spec.target_modules and not spec.exclude_modules:
        use_targets, targets = True, ["*_proj"]  # Automodel's default when all three are empty
    else:
        targets = spec.target_modules
    chosen: list[str] = []
    conv1d: list[str] = []
    used: set[str] = set()
    for name, is_linear in layers:
        hits = [p for p in targets if pattern_matches(p, name)] if use_targets else []
        excl = [p for p in spec.exclude_modules if pattern_matches(p, name)]
        used.update(hits + excl)
        if excl or (use_targets and not hits):
            continue
        # The output layer is adapted only when a target pattern names it: PEFT's "all-linear"
        # skips it too (parity), and a LoRA on a 128k-row lm_head costs memory for little gain.
        if name in output_names and not hits:
            continue
        (chosen if is_linear else conv1d).append(name)
    for p in (targets if use_targets else []) + spec.exclude_modules:
        if p not in used:
            logger.warning("lora: pattern %r matches no linear layer of the model", p)
    if conv1d:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in conv1d})
        raise ValueError(
            f"LoRA does not support transformers Conv1D layers (GPT-2 style, transposed "
            f"weights): {type(model).__name__} would adapt {len(conv1d)} of them ({leaves}). "
            "Fine-tune this model without LoRA (policy.dtensor_cfg.lora_cfg.enabled=false), "
            f"or add {leaves} to lora_cfg.exclude_modules to adapt only its nn.Linear layers."
        )
    if not chosen:
        raise ValueError(
            f"LoRA adapts no module: target_modules={spec.target_modules}, exclude_modules="
            f"{spec.exclude_modules}, match_all_linear={spec.match_all_linear}. Linear layers "
            f"look like {linear[:3]}; use bare names ('q_proj') or wildcards ('*.q_proj')."
        )
    return chosen


# --------------------------------------------------------------------------- autograd


def _kernels_usable(*tensors: Tensor) -> bool:
    from sftkit.model.kernels import lora_triton_available, triton_interpreting

    on_device = all(t.is_cuda for t in tensors) or triton_interpreting()
    return on_device and lora_triton_available()


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scale * (x_l A^T) B^T, saving x, x_l, A, B but not x_l A^T.

    `lora_x=None` means the LoRA input is x itself (no pre-dropout); `weight=None` computes
    only the LoRA branch (used for post-dropout). 2-D inputs [tokens, features].
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                lora_x: Tensor | None, A: Tensor, B: Tensor, scale: float,
                use_triton: bool) -> Tensor:  # fmt: skip
        lx = x if lora_x is None else lora_x
        triton_ok = use_triton and _kernels_usable(lx, A, B)
        if weight is None:
            out = torch.zeros(lx.shape[0], B.shape[0], dtype=lx.dtype, device=lx.device)
        else:
            out = F.linear(x, _dense(weight, x.dtype), bias)
        if triton_ok:
            from sftkit.model.kernels.lora import lora_forward_add_

            lora_forward_add_(out, lx, A, B, scale)
        else:
            out.addmm_(lx @ A.t(), B.t(), alpha=scale)
        need_x = weight is not None and weight.requires_grad
        # A frozen NF4 weight rides on ctx, not saved tensors: activation offload would copy
        # a dense host copy of it per layer (torch's save_on_cpu packs every saved tensor).
        ctx.nf4_weight = weight if weight is not None and _is_nf4(weight) else None
        saved_w = None if ctx.nf4_weight is not None else weight
        ctx.save_for_backward(x if (need_x or lora_x is None) else None, saved_w, lora_x, A, B)
        ctx.scale, ctx.triton_ok, ctx.has_bias = scale, triton_ok, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, lora_x, A, B = ctx.saved_tensors
        weight = ctx.nf4_weight if ctx.nf4_weight is not None else weight
        lx = x if lora_x is None else lora_x
        scale = ctx.scale
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        dx = dw = db = dlx = None
        # dX of the base path first, so the LoRA term can be added into it in place.
        if need[0] and weight is not None:
            dx = grad @ _dense(weight, grad.dtype)
        want_lora_dx = need[3] if lora_x is not None else need[0]
        into = dx if (lora_x is None and dx is not None) else None
        if want_lora_dx and ctx.triton_ok:
            from sftkit.model.kernels.lora import lora_backward_dx_add_

            target = into if into is not None else torch.zeros_like(lx)
            gB = lora_backward_dx_add_(target, grad, A, B, scale)
            if into is None:
                if lora_x is None:
                    dx = target
                else:
                    dlx = target
        else:
            gB = grad @ B  # [tokens, r]
            if want_lora_dx:
                if into is not None:
                    into.addmm_(gB, A, alpha=scale)
                elif lora_x is None:
                    dx = (gB @ A).mul_(scale)
                else:
                    dlx = (gB @ A).mul_(scale)
        dA = (gB.t() @ lx).mul_(scale) if need[4] else None
        dB = (grad.t() @ (lx @ A.t())).mul_(scale) if need[5] else None  # recomputes x A^T
        if weight is not None and need[1]:
            dw = grad.t() @ x
        if ctx.has_bias and need[2]:
            db = grad.sum(0)
        return dx, dw, db, dlx, dA, dB, None, None


# --------------------------------------------------------------------------- the module


class LoraLinear(nn.Linear):
    """An `nn.Linear` with a LoRA branch; made by class swap (see `apply_lora`), never built."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    lora_scale: float
    lora_dropout_position: str
    lora_use_triton: bool
    _lora_base_cls: type[nn.Linear]

    def reset_lora_parameters(self, init: str = "xavier") -> None:
        """A: xavier normal or kaiming uniform (a=sqrt 5); B: zeros (output equals the base)."""
        with torch.no_grad():
            if init == "xavier":
                nn.init.xavier_normal_(self.lora_A.weight)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if dora.has_dora(self):
            dora.init_magnitude(self)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        shape = x.shape
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        # An NF4 base (QLoRA) stays NF4 here: the Function dequantizes it per matmul and keeps
        # only the 4-bit tensor for backward, not a dense copy per layer.
        weight = self.weight if _is_nf4(self.weight) else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        A, B = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        active = self.training and self.lora_dropout_p > 0
        if _is_dtensor(weight, A, B, x2):  # tensor parallel: plain ops keep DTensor layouts
            if dora.has_dora(self):  # the config refuses it; a model built in code too
                raise ValueError("LoRA use_dora is not supported under tensor parallelism.")
            out = self._forward_composite(x2, weight, bias, A, B, active)
        else:
            with torch.autocast(dev, enabled=False):
                if dora.has_dora(self):
                    out = dora.dora_forward(self, x2, weight, bias, A, B, active,
                                             LoraLinearFunction.apply)  # fmt: skip
                elif active and self.lora_dropout_position == "post":
                    base = F.linear(x2, weight, bias)
                    branch = LoraLinearFunction.apply(
                        x2, None, None, None, A, B, self.lora_scale, self.lora_use_triton
                    )
                    out = base + self.lora_dropout(branch)
                else:
                    lora_x = self.lora_dropout(x2) if active else None
                    out = LoraLinearFunction.apply(
                        x2, weight, bias, lora_x, A, B, self.lora_scale, self.lora_use_triton
                    )
        return out.reshape(*shape[:-1], out.shape[-1])

    @property
    def lora_dropout_p(self) -> float:
        return float(getattr(self.lora_dropout, "p", 0.0))

    def _forward_composite(self, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor,
                           B: Tensor, active: bool) -> Tensor:  # fmt: skip
        base = F.linear(x, weight, bias)
        pre = active and self.lora_dropout_position == "pre"
        branch = F.linear(F.linear(self.lora_dropout(x) if pre else x, A), B) * self.lora_scale
        return base + (self.lora_dropout(branch) if active and not pre else branch)


def _is_dtensor(*tensors: Tensor) -> bool:
    return any(type(t).__name__ == "DTensor" for t in tensors)


def _is_nf4(t: Tensor) -> bool:
    """torchao's NF4Tensor (`sftkit.model.qlora`), known by name: torchao stays optional."""
    return type(t).__name__ == "NF4Tensor"


def _dense(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.to(dtype) if _is_nf4(weight) else weight  # NF4: dequantize


_LORA_CLASSES: dict[type, type] = {nn.Linear: LoraLinear}


def _lora_class(cls: type[nn.Linear]) -> type:
    """LoraLinear for nn.Linear; a cached LoRA subclass for subclasses of nn.Linear."""
    if cls not in _LORA_CLASSES:
        _LORA_CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraLinear, cls), {})
    return _LORA_CLASSES[cls]


def _inject(module: nn.Linear, spec: LoraSpec) -> None:
    dev = module.weight.device
    base_cls = type(module)
    module.lora_A = nn.Linear(module.in_features, spec.dim, bias=False, device=dev,
                              dtype=spec.lora_dtype)  # fmt: skip
    module.lora_B = nn.Linear(spec.dim, module.out_features, bias=False, device=dev,
                              dtype=spec.lora_dtype)  # fmt: skip
    module.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
    module.__class__ = _lora_class(base_cls)
    lora = cast(LoraLinear, module)
    lora._lora_base_cls = base_cls
    lora.lora_scale = spec.scale
    lora.lora_dropout_position = spec.dropout_position
    lora.lora_use_triton = spec.use_triton
    if spec.use_dora:
        dora.add_magnitude(lora, spec.lora_dtype)
    if dev.type != "meta":
        lora.reset_lora_parameters(spec.lora_A_init)


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Adapt `model` in place; freeze everything but LoRA; return the adapted module names.

    Call before tensor parallelism / FSDP (DESIGN order). On a meta-device model the LoRA
    weights stay uninitialised: call `reset_lora_parameters(model, spec)` after `to_empty`.
    With `spec.target_experts` the MoE experts' fused weights are adapted too, after the
    linear layers (`lora_experts`; their names are not in the returned list).
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA layers; apply it once.")
    names = select_lora_modules(model, spec)
    if spec.use_dora:
        dora.refuse_experts(names)
    for name in names:
        _inject(model.get_submodule(name), spec)  # type: ignore[arg-type]
    if spec.target_experts:

        def excluded(name: str) -> bool:
            return any(pattern_matches(p, name) for p in spec.exclude_modules)

        experts = lora_experts.apply_expert_lora(
            model, spec.dim, spec.alpha, spec.lora_A_init, spec.lora_dtype, excluded
        )
        logger.info("lora: adapted the fused weights of %d experts modules", len(experts))
    for pname, param in model.named_parameters():
        param.requires_grad_(_is_lora_param(pname))
    model._sftkit_lora_spec = spec  # type: ignore[assignment]
    n_lora = sum(p.numel() for n, p in model.named_parameters() if _is_lora_param(n))
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("lora: adapted %d modules, %d trainable parameters (%.3f%% of %d)",
                len(names), n_lora, 100.0 * n_lora / max(n_all, 1), n_all)  # fmt: skip
    return names


def reset_lora_parameters(model: nn.Module, spec: LoraSpec) -> None:
    """Initialise every LoRA layer (A per `spec.lora_A_init`, B = 0)."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.reset_lora_parameters(spec.lora_A_init)
    lora_experts.reset_expert_lora(model, spec.lora_A_init)


def _is_lora_param(name: str) -> bool:
    return any(f".{k}." in f".{name}" for k in ("lora_A", "lora_B", dora.MAGNITUDE))


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


# --------------------------------------------------------------------------- state / export


def _full(t: Tensor) -> Tensor:
    # A DTensor (FSDP2 / TP shard) is gathered; every rank must call this together.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights under PEFT's names: `base_model.model.<module>.lora_A.weight`, ..."""
    out: dict[str, Tensor] = {}
    for name, module in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _full(module.lora_A.weight).detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _full(module.lora_B.weight).detach()
        if dora.has_dora(module):  # PEFT's key has no `.weight`
            out[f"{PEFT_PREFIX}{name}.{dora.MAGNITUDE}"] = _full(dora.magnitude(module)).detach()
    return out | lora_experts.expert_lora_state_dict(model)


def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy adapter weights (PEFT names, with or without `.default`) into the LoRA layers."""
    own = lora_state_dict(model)
    params = {f"{PEFT_PREFIX}{n}.{ab}.weight": getattr(m, ab).weight
              for n, m in lora_modules(model).items() for ab in ("lora_A", "lora_B")}  # fmt: skip
    params |= {f"{PEFT_PREFIX}{n}.{dora.MAGNITUDE}": dora.magnitude(m)
               for n, m in lora_modules(model).items() if dora.has_dora(m)}  # fmt: skip
    given = {k.replace(".default.", ".").replace(f"{dora.MAGNITUDE}.weight", dora.MAGNITUDE): v
             for k, v in sd.items()}  # fmt: skip
    given = {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in given.items()}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not fit the model: missing {missing[:4]} "
            f"({len(missing)}), unexpected {unexpected[:4]} ({len(unexpected)}). "
            "Was the adapter trained with the same target_modules and model?"
        )
    with torch.no_grad():
        for key, value in given.items():
            if key in params and params[key].shape != value.shape:
                raise ValueError(f"LoRA weight {key}: shape {tuple(value.shape)} in the state "
                                 f"dict, {tuple(params[key].shape)} in the model; rank differs?")  # fmt: skip
            if key in params:
                params[key].copy_(value)
    lora_experts.load_expert_lora_state_dict(model, given)


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Leaf names when they select exactly the adapted layers, else an exact-name regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if {n for n in linear if n.rsplit(".", 1)[-1] in leaves} == set(names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def save_adapter(model: nn.Module, out_dir: Path, base_model_name_or_path: str,
                 spec: LoraSpec) -> None:  # fmt: skip
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT LoRA format).

    Under torch.distributed every rank must call it (sharded weights are gathered); only
    rank 0 writes.
    """
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(lora_modules(model))
    save_file(sd, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.dim,
        "lora_alpha": spec.alpha,
        # PEFT applies dropout on the LoRA input ("pre"); "post" is not representable and
        # only matters in training. sftkit_lora_config.json keeps the exact spec.
        "lora_dropout": spec.dropout,
        "target_modules": _peft_target_modules(model, names),
        **_peft_target_parameters(model),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": spec.use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    exact = {**asdict(spec), "lora_dtype": str(spec.lora_dtype), "adapted_modules": names}
    (out_dir / SFTKIT_LORA_CONFIG).write_text(json.dumps(exact, indent=2) + "\n")


def _peft_target_parameters(model: nn.Module) -> dict[str, list[str]]:
    # PEFT reads `target_parameters` from 0.17 on (pyproject's floor); absent without experts.
    targets = lora_experts.peft_target_parameters(model)
    return {"target_parameters": targets} if targets else {}


def merge_lora(model: nn.Module) -> None:
    """In place: W += scale * B @ A (DoRA: `dora.merged_weight`), then restore plain linear
    layers (a normal HF model)."""
    lora_experts.merge_expert_lora(model)
    for module in lora_modules(model).values():
        with torch.no_grad():
            if _is_nf4(module.weight):  # QLoRA: merge into the dequantized base
                module.weight = nn.Parameter(module.weight.to(module.weight.dtype), False)
            w = module.weight
            A, B = module.lora_A.weight, module.lora_B.weight
            if dora.has_dora(module):
                merged = dora.merged_weight(w, A, B, module.lora_scale, dora.magnitude(module))
            else:
                merged = w.float() + module.lora_scale * (B.float() @ A.float())
            w.copy_(merged.to(w.dtype))
        base_cls = module._lora_base_cls
        for attr in ("lora_A", "lora_B", "lora_dropout", dora.MAGNITUDE):
            if hasattr(module, attr):
                delattr(module, attr)
        for attr in ("lora_scale", "lora_dropout_position", "lora_use_triton", "_lora_base_cls"):
            module.__dict__.pop(attr, None)
        module.__class__ = base_cls  # type: ignore[assignment]  # the swap back to nn.Linear
    if hasattr(model, "_sftkit_lora_spec"):
        del model._sftkit_lora_spec
