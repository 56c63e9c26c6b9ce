"""A run's state: `Run`, everything the loop touches (its resumable counters are
`sftkit.checkpoint.state.TrainState`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sftkit.checkpoint.checkpointer import Checkpointer
from sftkit.checkpoint.state import TrainState
from sftkit.config import MasterConfig
from sftkit.data.loader import BatchPlan, GlobalBatchSampler
from sftkit.data.types import ExampleSet
from sftkit.dist import DistEnv
from sftkit.log import ConsoleReporter, Loggers
from sftkit.train.step import StepOptions
from sftkit.train.validation import Validator

if TYPE_CHECKING:
    from sftkit.lifecycle.lock import RunLock


@dataclass
class Run:
    """Everything the loop touches, built once by `sftkit.train.recipe.setup`."""

    cfg: MasterConfig
    env: DistEnv
    tokenizer: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LRScheduler
    sampler: GlobalBatchSampler
    plan: BatchPlan
    step_opts: StepOptions
    train_examples: ExampleSet
    validator: Validator
    state: TrainState
    checkpointer: Checkpointer
    loggers: Loggers
    console: ConsoleReporter
    total_steps: int
    deadline: float | None  # seconds from the start by which the last save must be done
    flops_per_token: float | None
    peak_flops: float | None
    lock: RunLock | None = None  # rank 0's lock on checkpoint_dir (`run_sft` sets it)
