"""Validation: one loss per validation set plus the token-weighted loss over all of them."""

from __future__ import annotations

from torch import nn

from sftkit.batch import PackedBatch
from sftkit.config.schema import SFTConfig
from sftkit.data.loader import BatchPlan, iterate_eval_batches, micro_batches
from sftkit.data.types import ExampleSet
from sftkit.dist import DistEnv
from sftkit.model.context_parallel import shard_batches
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
            share = chunk[env.dp_rank :: env.dp_size]
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
