"""A run's state: `Run`, everything the loop touches (its resumable counters are
`sftkit.checkpoint.state.TrainState`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sftkit.checkpoint.checkpointer import Checkpointer
from sftkit.checkpoint.layout import ranking_metric
from sftkit.checkpoint.state import TrainState
from sftkit.config import MasterConfig
from sftkit.data.loader import BatchPlan, GlobalBatchSampler
from sftkit.data.types import ExampleSet
from sftkit.dist import DistEnv
from sftkit.log import ConsoleReporter, Loggers, mfu
from sftkit.train.samples import report_val_samples
from sftkit.train.step import StepOptions
from sftkit.train.validation import validation_metrics


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
    val_examples: ExampleSet
    state: TrainState
    checkpointer: Checkpointer
    loggers: Loggers
    console: ConsoleReporter
    total_steps: int
    deadline: float | None  # seconds from the start by which the last save must be done
    flops_per_token: float | None
    peak_flops: float | None

    @property
    def has_validation(self) -> bool:
        return bool(self.val_examples)

    def should_validate(self, step: int, last_step: bool) -> bool:
        """Every `sft.val_period` steps, and at the last step with `sft.val_at_end`."""
        period = self.cfg.sft.val_period
        periodic = period > 0 and step % period == 0
        return self.has_validation and (periodic or (self.cfg.sft.val_at_end and last_step))

    def validate(self, step: int) -> float:
        """Validation loss per set over `sft.val_batches` batches each; logged at `step`."""
        t0 = time.monotonic()
        metrics = validation_metrics(
            self.model, self.val_examples, self.cfg.sft, self.plan, self.step_opts, self.env
        )
        val_loss = metrics["validation/val_loss"]
        metrics["timing/validation/total_validation_time"] = time.monotonic() - t0
        self.state.metrics.update(ranking_metric(self.cfg.checkpointing.metric_name, metrics))
        self.loggers.log(metrics, step)
        self.console.validation(step, metrics)
        report_val_samples(self, step)  # logger.num_val_samples_to_print; all ranks take part
        return val_loss

    def throughput_metrics(self, real: int, processed: int, step_time: float) -> dict[str, float]:
        """Real (non-pad) tokens/s, padding fraction and, on GPUs with a known peak, MFU.

        `real` and `processed` are this rank's example tokens and row tokens (pads included).
        """
        real_total, processed_total = self.env.sum(real), self.env.sum(processed)
        per_gpu = real_total / step_time / self.env.world_size
        out = {
            "timing/train/real_tokens_per_sec_per_gpu": per_gpu,
            "train/padding_fraction": 1 - real_total / max(processed_total, 1),
        }
        value = mfu(per_gpu, self.flops_per_token or 0, self.peak_flops)
        if value is not None:
            out["train/mfu"] = value
        return out
