"""Optimizer and LR scheduler from NeMo RL's `policy.optimizer` / `policy.scheduler` schema."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from sftkit.config.dotted import import_object
from sftkit.train.bf16_optim import BF16AdamW

logger = logging.getLogger("sftkit")

DEFAULT_OPTIMIZER = "torch.optim.AdamW"
DEFAULT_OPTIMIZER_KWARGS: dict[str, Any] = {"lr": 5.0e-6, "weight_decay": 0.1}


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str | None,
    kwargs: dict[str, Any] | None,
    prefer_fused: bool = False,
    bf16_update: str = "none",
    seed: int = 0,
) -> torch.optim.Optimizer:
    """`name` is a dotted class path; `kwargs` go to its constructor (lists become tuples).

    `prefer_fused` (the recipe sets it on CUDA without tensor parallelism) turns NeMo RL's
    `foreach: false, fused: false` into torch's fused Adam/AdamW (see `_prefer_fused`).
    `bf16_update` (`policy.dtensor_cfg.bf16_params_update`) other than "none" replaces
    Adam/AdamW by `BF16AdamW` with that rounding, seeded by `seed`.
    """
    if name is None:  # Megatron recipes set policy.optimizer: null
        logger.warning("policy.optimizer is null: using %s", DEFAULT_OPTIMIZER)
        name, kwargs = DEFAULT_OPTIMIZER, DEFAULT_OPTIMIZER_KWARGS
    cls = import_object(name, "policy.optimizer.name")
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in (kwargs or {}).items()}
    if bf16_update != "none":
        cls, clean = _bf16_update(cls, clean, bf16_update, seed)
    elif prefer_fused:
        clean = _prefer_fused(cls, clean)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check policy.dtensor_cfg.lora_cfg")
    try:
        return cls(params, **clean)
    except TypeError as err:
        raise ValueError(f"policy.optimizer.kwargs do not fit {name}: {err}") from err


def _prefer_fused(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Adam/AdamW with neither `foreach` nor `fused` on become fused, with one log line.

    NeMo RL's recipes switch both off (an old workaround for DTensor parameters), which on a
    GPU leaves torch's per-parameter loop: about ten kernels per parameter per step. The
    fused kernel computes the same update in one pass, and lets the train step clip and skip
    non-finite updates without waiting on the host (`step.device_side_update`). Setting
    `foreach: true` keeps torch's multi-tensor path instead.
    """
    if cls not in (torch.optim.Adam, torch.optim.AdamW) or kwargs.get("foreach"):
        return kwargs
    if kwargs.get("fused") or kwargs.get("differentiable"):
        return kwargs
    logger.info(
        "policy.optimizer: %s with fused=True on CUDA (the same update as the per-parameter "
        "loop that foreach/fused=false select, in one kernel); set "
        "policy.optimizer.kwargs.foreach=true to use torch's multi-tensor path instead",
        cls.__name__,
    )
    return {**kwargs, "fused": True, "foreach": None}


def _bf16_update(
    cls: type, kwargs: dict[str, Any], rounding: str, seed: int
) -> tuple[type, dict[str, Any]]:
    """Adam/AdamW's arguments for `BF16AdamW` (the same update, rounded by `rounding`)."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW):
        raise ValueError(
            f"policy.dtensor_cfg.bf16_params_update={rounding!r} needs policy.optimizer.name "
            f"torch.optim.AdamW or torch.optim.Adam, not {cls.__module__}.{cls.__name__}; "
            "set bf16_params_update=none to use it"
        )
    decoupled = cls is torch.optim.AdamW or bool(kwargs.get("decoupled_weight_decay"))
    logger.info(
        "policy.optimizer: bf16 parameters updated by %s with %s rounding (float32 moments)",
        cls.__name__,
        rounding,
    )
    extra = {"rounding": rounding, "seed": seed, "decoupled_weight_decay": decoupled}
    return BF16AdamW, {**kwargs, **extra}


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: Any
) -> torch.optim.lr_scheduler.LRScheduler:
    """NeMo RL's schema: null (constant LR), one {name, kwargs}, or a list of them plus one
    {milestones: [...]} entry, chained with SequentialLR. Stepped once per optimizer step."""
    if spec is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if isinstance(spec, dict):
        return _one_scheduler(optimizer, spec, "policy.scheduler")
    if not isinstance(spec, list):
        raise ValueError(
            f"policy.scheduler must be a mapping {{name, kwargs}} or a list of them, got {spec!r}"
        )
    milestones = [e["milestones"] for e in spec if isinstance(e, dict) and "milestones" in e]
    entries = [e for e in spec if not (isinstance(e, dict) and "milestones" in e)]
    if len(entries) == 1 and not milestones:
        return _one_scheduler(optimizer, entries[0], "policy.scheduler[0]")
    if len(milestones) != 1 or len(milestones[0]) != len(entries) - 1:
        raise ValueError(
            f"policy.scheduler lists {len(entries)} schedulers, so it needs one "
            f"{{milestones: [...]}} entry with {len(entries) - 1} step numbers"
        )
    schedulers = [
        _one_scheduler(optimizer, e, f"policy.scheduler[{i}]") for i, e in enumerate(entries)
    ]
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, schedulers, milestones=list(milestones[0])
    )


def _one_scheduler(optimizer: torch.optim.Optimizer, entry: Any, key: str) -> Any:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(
            f"{key} must be a mapping with 'name' (and optional 'kwargs'), got {entry!r}"
        )
    cls = import_object(entry["name"], f"{key}.name")
    try:
        return cls(optimizer, **(entry.get("kwargs") or {}))
    except TypeError as err:
        raise ValueError(f"{key}.kwargs do not fit {entry['name']}: {err}") from err
