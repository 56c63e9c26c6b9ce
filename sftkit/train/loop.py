"""The training loop: one function, read top to bottom.

micro-batches -> loss -> clip -> step -> LR -> log -> validate -> save, until the step or
epoch budget, a preemption signal or the checkpoint deadline says stop. What stops a run
lives in `sftkit.lifecycle.signals`; exit codes in `sftkit.errors`.
"""

from __future__ import annotations

import logging
import time

from sftkit.checkpoint.layout import ranking_metric
from sftkit.data.loader import dummy_micro_batch, micro_batches, rank_share
from sftkit.errors import EXIT_OK, EXIT_REQUEUE
from sftkit.lifecycle.lock import ensure_held
from sftkit.lifecycle.signals import Deadline, StopFlag
from sftkit.lifecycle.stall import report_position
from sftkit.log import throughput_metrics
from sftkit.model.context_parallel import shard_batches
from sftkit.train.state import Run
from sftkit.train.step import train_step

logger = logging.getLogger("sftkit")


def train(run: Run, stop: StopFlag | None = None) -> int:
    """Run the loop on a prepared `Run` (`sftkit.train.recipe.setup`); returns the exit code.

    `stop`: the caller's installed flag (it restores the handlers), else one of our own."""
    cfg, env, state, sampler = run.cfg, run.env, run.state, run.sampler
    checkpointer, validator, dims = run.checkpointer, run.validator, env.dims
    own = stop is None
    stop = stop or StopFlag()
    if own:
        stop.install()
    stop.interrupt = False  # from here a signal finishes the step and saves
    deadline = Deadline(run.deadline)
    if state.validation_due and validator.enabled:
        logger.info("Running the validation the stopped run skipped at step %d", state.step)
        state.metrics.update(validator.validate(step=state.step))
    elif state.step == 0 and cfg.sft.val_at_start and validator.enabled:
        state.metrics.update(validator.validate(step=0))
    state.validation_due = False
    exit_code = EXIT_OK
    try:
        while state.step < run.total_steps:
            t_step = time.monotonic()
            indices = sampler.next_batch()
            if indices is None:  # epoch boundary
                state.epoch = sampler.epoch
                if state.epoch >= cfg.sft.max_num_epochs:
                    break
                continue
            step = state.step + 1
            report_position(env, step, "train")  # names this rank if it stalls (lifecycle.stall)

            # Micro-batches for this rank; every rank runs the same number (dummies pad).
            mine = [run.train_examples[i] for i in rank_share(indices, env.dp_rank, dims.dp)]
            batches = micro_batches(mine, run.plan)
            count = int(env.max(len(batches)))
            batches += [dummy_micro_batch(run.plan.pad_id)] * (count - len(batches))
            batches = shard_batches(batches, env)  # context parallel: this rank's chunks
            global_tokens = int(env.sum(sum(b.num_target_tokens for b in batches)))
            global_seqs = len(indices)
            t_data = time.monotonic()

            result = train_step(
                run.model, run.optimizer, batches, global_tokens, run.step_opts, env, step
            )
            lr = run.optimizer.param_groups[0]["lr"]
            run.scheduler.step()
            t_train = time.monotonic()

            state.step = step
            state.consumed_samples += global_seqs
            state.total_valid_tokens += global_tokens
            state.epoch = sampler.epoch
            step_time = t_train - t_step
            metrics = {
                "train/loss": result["loss"],
                "train/grad_norm": result["grad_norm"],
                "train/lr": lr,
                "train/global_valid_seqs": global_seqs,
                "train/global_valid_toks": global_tokens,
                "train/num_unmasked_tokens": global_tokens,
                "train/num_valid_samples": global_seqs,
                "timing/train/total_step_time": step_time,
                "timing/train/data_processing": t_data - t_step,
                "timing/train/policy_training": t_train - t_data,
                "timing/train/valid_tokens_per_sec_per_gpu": global_tokens
                / step_time
                / env.world_size,
            }
            metrics.update(run.train_examples.sample_counts(indices))  # train/samples/<name>
            # MoE: train/aux_loss and train/moe/load_cv* (`sftkit.train.moe`).
            metrics.update({k: v for k, v in result.items() if k.startswith("train/")})
            real = env.sum(sum(len(e.input_ids) for e in mine) // dims.cp)
            processed = env.sum(sum(b.input_ids.numel() for b in batches))
            metrics.update(
                throughput_metrics(real, processed, step_time, env.world_size,
                                   run.flops_per_token, run.peak_flops)
            )  # fmt: skip
            run.loggers.log(metrics, step)
            run.console.step(step, metrics)
            # The checkpoint ranking metric is the value measured at this step (validation
            # below adds val:<name>), never a stale one from an earlier step.
            state.metrics = ranking_metric(cfg.checkpointing.metric_name, metrics)

            last_step = step >= run.total_steps
            # Stop early on a signal (any rank) or when the deadline leaves no room to save.
            stopping = env.max(stop.signum is not None) > 0
            if run.deadline is not None:
                stopping = stopping or env.max(deadline.near(t_step)) > 0
            if validator.should_validate(step, last_step):
                if stopping:  # save first: a long validation can outlast the grace period
                    logger.warning("Skipping the validation due at step %d to save and stop "
                                   "first; the resumed run runs it", step)  # fmt: skip
                    state.validation_due = True
                else:
                    report_position(env, step, "validation")
                    state.metrics.update(validator.validate(step))
            if checkpointer.should_save(step, last_step, stopping):
                ensure_held(run.lock, env)  # a run whose lock was taken over writes nothing
                report_position(env, step, "checkpoint save")
                t_save = time.monotonic()
                checkpointer.save(state, last=last_step or stopping)
                paused = time.monotonic() - t_save  # an async save: copying the state only
                # the deadline must leave room for a whole save, background part included
                deadline.last_save = max(paused, checkpointer.save_seconds)
                run.loggers.log({"timing/train/checkpointing": paused}, step)
            if stopping:
                reason = stop.reason or "checkpointing.checkpoint_must_save_by"
                saved = "after saving" if cfg.checkpointing.enabled else "WITHOUT a checkpoint"
                logger.warning(
                    "Stopping at step %d (%s) %s; start the same command again to resume "
                    "(exit code %d)",
                    step,
                    reason,
                    saved,
                    EXIT_REQUEUE,
                )
                exit_code = EXIT_REQUEUE
                break
    finally:
        if own:
            stop.restore()
    return exit_code
