"""Model transforms for scale-out, in one fixed order: LoRA -> TP -> activation
checkpointing -> compile -> FSDP2 (LoRA is applied by the caller first)."""

from __future__ import annotations

import logging

from torch import nn

from sftkit.config import MasterConfig
from sftkit.train.dist import DistEnv

logger = logging.getLogger("sftkit")


def parallelize(model: nn.Module, cfg: MasterConfig, env: DistEnv) -> tuple[nn.Module, float]:
    """Apply the configured transforms; returns (model, gradient scale).

    The gradient scale undoes a data-parallel wrapper's gradient averaging so that the
    globally normalised loss yields true gradients (1.0 when nothing averages).
    """
    d = cfg.policy.dtensor_cfg
    if d.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(env.device)
    if env.world_size > 1:
        raise NotImplementedError("multi-rank training is not wired yet")
    return model, 1.0
