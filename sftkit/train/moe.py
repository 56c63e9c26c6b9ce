"""An MoE router's load-balancing loss, added as the model's own HF `forward` adds it.

HF's MoE causal LMs (Qwen3-MoE, Mixtral, gpt-oss, OLMoE, ...) add
`router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k,
attention_mask)` to the loss when `config.output_router_logits` is on. sftkit computes the
NLL itself from the decoder body, so without this module the coefficient would do nothing.
Here the router outputs are recorded by forward hooks on the modules the family's own
`_can_record_outputs["router_logits"]` names (what HF records), and the family's own
`load_balancing_loss_func` is called on them with the batch's real-token mask (packed rows:
the documents, never the pad tail), so one micro-batch gives HF's number exactly.

Across micro-batches and ranks each micro-batch's term is weighted by its share of the
step's trained tokens (`train_step`); the balancing statistics are those of one forward on
one rank, as in HF (no all-reduce of the router statistics between data-parallel ranks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sftkit.dist import DistEnv

# Families whose HF `ForCausalLM.forward` adds `router_aux_loss_coef * aux_loss` from the
# module's `load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok,
# attention_mask)`, checked against HF's forward in tests/unit/train/test_train_moe.py. Another
# family with a non-zero coefficient and `output_router_logits` on is refused.
ROUTER_LOSS_FAMILIES = frozenset({"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"})

BalanceFn = Callable[..., Tensor]


@dataclass
class RouterLoss:
    """The family's balancing loss and what it needs; also records the router outputs."""

    coef: float  # router_aux_loss_coef (HF's name and NeMo RL's hf_config_overrides key)
    in_loss: bool  # output_router_logits on and coef != 0: the term is trained
    num_experts: int
    top_k: int
    balance: BalanceFn  # the family's own load_balancing_loss_func
    load_shape: tuple[int, int] = (0, 0)  # (router layers, experts)
    _recorded: list[Tensor] | None = field(default=None, repr=False)

    @contextmanager
    def record(self) -> Iterator[list[Tensor]]:
        """Collect the router outputs of the forwards run inside (activation-checkpoint
        recomputation in the backward runs outside, so it is not counted twice)."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            if self._recorded is not None:
                out = output[index] if isinstance(output, tuple) else output
                if out is not None:
                    self._recorded.append(out)

        return capture

    def aux_and_load(
        self, router_logits: list[Tensor], real_tokens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(HF's `aux_loss` for this forward, [layers, experts] real tokens routed to each
        expert, a top-k choice counting once)."""
        aux = self.balance(tuple(router_logits), self.num_experts, self.top_k, real_tokens)
        with torch.no_grad():
            mask = real_tokens.reshape(-1).float()
            load = torch.stack([
                torch.zeros(self.num_experts, device=logits.device).scatter_add_(
                    0,
                    torch.topk(logits.float(), self.top_k, dim=-1).indices.reshape(-1),
                    mask.to(logits.device).repeat_interleave(self.top_k),
                )
                for logits in router_logits
            ])  # fmt: skip
        return aux, load


def _config_flags(model: nn.Module) -> tuple[bool, float]:
    config: Any = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    on = bool(getattr(text, "output_router_logits", False))
    return on, float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)


def _family_balance(model: nn.Module) -> BalanceFn | None:
    # FSDP2 subclasses the model's class, so look through the MRO for HF's module.
    for cls in type(model).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if callable(fn):
            return fn
    return None


def router_loss_for(model: nn.Module, env: DistEnv) -> RouterLoss | None:
    """The router loss of a supported MoE family (its hooks installed), None for a dense
    model; a family sftkit cannot reproduce is refused when its loss would be trained."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", ""))
    on, coef = _config_flags(model)
    supported = model_type in ROUTER_LOSS_FAMILIES
    if on and coef != 0 and not supported:
        raise ValueError(
            f"{model_type} with output_router_logits=True and router_aux_loss_coef={coef}: "
            "sftkit does not reproduce this family's router load-balancing loss; set "
            "policy.hf_config_overrides.router_aux_loss_coef=0.0 (as NeMo RL's MoE recipes do) "
            "or output_router_logits=false"
        )
    if not supported:
        return None
    if env.dims.cp > 1:
        if on and coef != 0:
            raise ValueError(
                "the MoE router loss (output_router_logits with router_aux_loss_coef="
                f"{coef}) is not implemented with context parallelism; set "
                "policy.dtensor_cfg.context_parallel_size=1 or "
                "policy.hf_config_overrides.router_aux_loss_coef=0.0"
            )
        return None  # statistics over a sequence chunk would not be HF's: none logged
    recorders = getattr(model, "_can_record_outputs", None) or {}
    spec = recorders.get("router_logits")
    balance = _family_balance(model)
    if spec is None or balance is None:
        raise ValueError(f"{model_type}: no router_logits recorder or load_balancing_loss_func")
    target, index = getattr(spec, "target_class", spec), getattr(spec, "index", 1)
    router = RouterLoss(
        coef=coef,
        in_loss=on and coef != 0,
        num_experts=int(model.num_experts),  # type: ignore[arg-type]
        top_k=int(model.num_experts_per_tok),  # type: ignore[arg-type]
        balance=balance,
    )
    routers = [m for m in model.modules() if isinstance(m, target)]
    if not routers:
        raise ValueError(f"{model_type}: no {getattr(target, '__name__', target)} module found")
    for module in routers:
        module.register_forward_hook(router.hook(index))
    router.load_shape = (len(routers), router.num_experts)
    return router


def load_metrics(load: Tensor) -> dict[str, float]:
    """Coefficient of variation (std / mean) of tokens per expert: the max over layers and
    each layer's (0: perfectly balanced; sqrt(experts / top_k - 1): every token on the same
    top-k experts, i.e. routing collapse)."""
    mean = load.mean(dim=1).clamp_min(1e-12)
    cv = (load.std(dim=1, unbiased=False) / mean).tolist()
    metrics = {"train/moe/load_cv_max": max(cv)}
    metrics.update({f"train/moe/load_cv/layer_{i}": v for i, v in enumerate(cv)})
    return metrics
