"""Validation: one loss per validation set plus the token-weighted loss over all of them
(`validation_metrics`), and the `Validator` the loop asks when and how to validate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from torch import nn

from sftkit.batch import PackedBatch
from sftkit.checkpoint.layout import ranking_metric
from sftkit.config import MasterConfig
from sftkit.config.schema import SFTConfig
from sftkit.data.loader import BatchPlan, iterate_eval_batches, micro_batches, rank_share
from sftkit.data.types import ExampleSet
from sftkit.dist import DistEnv
from sftkit.log import ConsoleReporter, Loggers
from sftkit.model.context_parallel import shard_batches
from sftkit.train.samples import print_samples, val_samples
from sftkit.train.step import StepOptions, validation_loss


def validation_metrics(
    model: nn.Module,
    examples: ExampleSet,
    sft: SFTConfig,
    plan: BatchPlan,
    opts: StepOptions,
    env: DistEnv,
) -> dict[str, float]:
    """`validation/<name>/val_loss` for each set and `validation/val_loss` over all sets.

    `sft.val_batches` batches of `sft.val_global_batch_size` examples are taken from each
    set; the combined loss weighs every set by its target tokens, so it equals the mean
    over all their tokens. With one set the combined value is that set's loss itself.
    """
    eval_plan = BatchPlan(
        micro_batch_size=sft.val_micro_batch_size, multiple_of=plan.multiple_of, pad_id=plan.pad_id
    )
    metrics: dict[str, float] = {}
    nll, tokens = 0.0, 0
    sets = examples.parts() or [("validation", examples)]
    for name, part in sets:
        batches: list[PackedBatch] = []
        for chunk in iterate_eval_batches(part, sft.val_global_batch_size, sft.val_batches):
            share = rank_share(chunk, env.dp_rank, env.dims.dp)  # as the training batches
            batches += shard_batches(micro_batches(share, eval_plan), env) if share else []
        loss, count = validation_loss(model, batches, opts, env)
        metrics[f"validation/{name}/val_loss"] = loss
        if count:
            nll, tokens = nll + loss * count, tokens + count
    if len(sets) == 1:
        metrics["validation/val_loss"] = next(iter(metrics.values()))
    else:
        metrics["validation/val_loss"] = nll / tokens if tokens else float("nan")
    return metrics


@dataclass
class Validator:
    """When to validate, and validating: losses, the checkpoint ranking metric, samples.

    Built once by `setup`; the loop asks `should_validate` each step and calls `validate`."""

    cfg: MasterConfig
    env: DistEnv
    model: nn.Module
    tokenizer: Any
    examples: ExampleSet
    plan: BatchPlan
    opts: StepOptions
    loggers: Loggers
    console: ConsoleReporter

    @property
    def enabled(self) -> bool:
        return bool(self.examples)

    def should_validate(self, step: int, last_step: bool) -> bool:
        """Every `sft.val_period` steps, and at the last step with `sft.val_at_end`."""
        period = self.cfg.sft.val_period
        periodic = period > 0 and step % period == 0
        return self.enabled and (periodic or (self.cfg.sft.val_at_end and last_step))

    def validate(self, step: int) -> dict[str, float]:
        """Validation loss per set over `sft.val_batches` batches each, logged at `step`, then
        the samples; returns the checkpoint ranking metric it measured (may be empty)."""
        t0 = time.monotonic()
        metrics = validation_metrics(
            self.model, self.examples, self.cfg.sft, self.plan, self.opts, self.env
        )
        metrics["timing/validation/total_validation_time"] = time.monotonic() - t0
        self.loggers.log(metrics, step)
        self.console.validation(step, metrics)
        self.samples(step)  # logger.num_val_samples_to_print; all ranks take part
        return ranking_metric(self.cfg.checkpointing.metric_name, metrics)

    def samples(self, step: int) -> None:
        """Generate, print and log the first `logger.num_val_samples_to_print` samples."""
        log = self.cfg.logger
        n = log.num_val_samples_to_print
        if n <= 0 or not self.examples:
            return
        records = val_samples(
            self.model, self.tokenizer, self.examples[:n], step, self.env,
            self.opts.compute_dtype, log.val_sample_max_new_tokens,
        )  # fmt: skip
        if self.env.is_main:
            print_samples(records, step)
            self.loggers.log_samples(records, step)
