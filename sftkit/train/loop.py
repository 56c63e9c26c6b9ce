"""The training loop: one function, read top to bottom.

micro-batches -> loss -> clip -> step -> LR -> log -> validate -> save, until the step or
epoch budget, a preemption signal or the checkpoint deadline says stop.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from sftkit.data.loader import dummy_micro_batch, micro_batches, rank_share
from sftkit.model.context_parallel import shard_batches
from sftkit.train.checkpoint import ranking_metric
from sftkit.train.step import train_step

logger = logging.getLogger("sftkit")

EXIT_OK = 0  # finished: every step done, final_hf written
EXIT_FAILURE = 1  # an error during training (non-finite loss or gradient, a crash)
EXIT_USAGE = 2  # a config or usage error, reported before training starts
EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved and stopped early (signal or deadline); start again


@dataclass
class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop finishes its step, saves and exits for requeue."""

    signum: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(run: Any) -> int:
    """Run the loop on a prepared `sftkit.train.recipe.Run`; returns the process exit code."""
    cfg, env, state, sampler = run.cfg, run.env, run.state, run.sampler
    stop = StopFlag()
    stop.install()
    started = time.monotonic()
    last_save_time = 0.0
    if state.step == 0 and cfg.sft.val_at_start and run.has_validation:
        run.validate(step=0)
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

            # Micro-batches for this rank; every rank runs the same number (dummies pad).
            mine = [run.train_examples[i] for i in rank_share(indices, env.dp_rank, env.dp_size)]
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
            real = sum(len(e.input_ids) for e in mine) // env.cp_size
            processed = sum(b.input_ids.numel() for b in batches)
            metrics.update(run.throughput_metrics(real, processed, step_time))
            run.loggers.log(metrics, step)
            run.console.step(step, metrics)
            # The checkpoint ranking metric is the value measured at this step (validation
            # below adds val:<name>), never a stale one from an earlier step.
            state.metrics = ranking_metric(cfg.checkpointing.metric_name, metrics)

            last_step = step >= run.total_steps
            period = cfg.sft.val_period
            if run.has_validation and (
                (period > 0 and step % period == 0) or (cfg.sft.val_at_end and last_step)
            ):
                run.validate(step)

            # Stop early on a signal (any rank) or when the deadline leaves no room to save.
            stopping = env.max(stop.signum is not None) > 0
            if run.deadline is not None:
                elapsed = time.monotonic() - started
                needed = 2 * (time.monotonic() - t_step) + last_save_time
                stopping = stopping or env.max(elapsed + needed >= run.deadline) > 0
            if run.should_save(step, last_step) or (stopping and cfg.checkpointing.enabled):
                t_save = time.monotonic()
                run.save()
                last_save_time = time.monotonic() - t_save
                run.loggers.log({"timing/train/checkpointing": last_save_time}, step)
            if stopping:
                reason = (
                    f"signal {signal.Signals(stop.signum).name}"
                    if stop.signum
                    else "checkpointing.checkpoint_must_save_by"
                )
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
        stop.restore()
    return exit_code
