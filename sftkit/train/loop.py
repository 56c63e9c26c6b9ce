"""The training loop: one function, read top to bottom.

micro-batches -> loss -> clip -> step -> LR -> log -> validate -> save, until the step or
epoch budget, a preemption signal or the checkpoint deadline says stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftkit.checkpoint.layout import ranking_metric
from sftkit.data.loader import dummy_micro_batch, micro_batches, rank_share
from sftkit.model.context_parallel import shard_batches
from sftkit.train.state import Run
from sftkit.train.step import train_step

logger = logging.getLogger("sftkit")

EXIT_OK = 0  # finished: every step done, final_hf written
EXIT_FAILURE = 1  # an error during training (non-finite loss or gradient, a crash)
EXIT_USAGE = 2  # a config or usage error, reported before training starts
EXIT_REQUEUE = 75  # EX_TEMPFAIL: saved and stopped early (signal or deadline); start again


MARKER_ENV = "SFTKIT_PREEMPTED_MARKER"  # where rank 0 leaves the marker (launcher scripts)
MARKER_NAME = ".preempted"  # default: <checkpoint_dir>/.preempted


class Preempted(BaseException):
    """A stop signal during setup: nothing to save yet, so the run ends at once (exit 75).
    A BaseException, like KeyboardInterrupt, so no `except Exception` in setup swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def preempted_marker(checkpoint_dir: Path) -> Path:
    """The file rank 0 writes when the run stops for requeue (exit 75).

    torchrun returns 1 whatever its ranks returned, so job scripts test for this file
    instead (`examples/slurm/sft.sbatch`); `$SFTKIT_PREEMPTED_MARKER` overrides the path.
    """
    return Path(os.environ.get(MARKER_ENV) or checkpoint_dir / MARKER_NAME)


def write_preempted_marker(path: Path, step: int, reason: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}) + "\n")
    except OSError as err:  # the exit code still says 75 where the launcher passes it on
        logger.warning("Could not write the preemption marker %s: %s", path, err)


@dataclass
class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop finishes its step, saves and exits for requeue.

    While `interrupt` is set (setup: tokenizing, loading the model) the handler raises
    Preempted instead, so a signal then ends the run at once rather than after setup.
    """

    signum: int | None = None
    previous: dict[int, Any] = field(default_factory=dict)
    interrupt: bool = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if self.interrupt:
            raise Preempted(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(run: Run, stop: StopFlag | None = None) -> int:
    """Run the loop on a prepared `Run` (`sftkit.train.recipe.setup`); returns the exit code.

    `stop`: the caller's installed flag (it restores the handlers), else one of our own."""
    cfg, env, state, sampler = run.cfg, run.env, run.state, run.sampler
    checkpointer = run.checkpointer
    own = stop is None
    stop = stop or StopFlag()
    if own:
        stop.install()
    stop.interrupt = False  # from here a signal finishes the step and saves
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
            metrics.update(run.train_examples.sample_counts(indices))  # train/samples/<name>
            real = sum(len(e.input_ids) for e in mine) // env.cp_size
            processed = sum(b.input_ids.numel() for b in batches)
            metrics.update(run.throughput_metrics(real, processed, step_time))
            run.loggers.log(metrics, step)
            run.console.step(step, metrics)
            # The checkpoint ranking metric is the value measured at this step (validation
            # below adds val:<name>), never a stale one from an earlier step.
            state.metrics = ranking_metric(cfg.checkpointing.metric_name, metrics)

            last_step = step >= run.total_steps
            if run.should_validate(step, last_step):
                run.validate(step)

            # Stop early on a signal (any rank) or when the deadline leaves no room to save.
            stopping = env.max(stop.signum is not None) > 0
            if run.deadline is not None:
                elapsed = time.monotonic() - started
                needed = 2 * (time.monotonic() - t_step) + last_save_time
                stopping = stopping or env.max(elapsed + needed >= run.deadline) > 0
            if checkpointer.should_save(step, last_step, stopping):
                t_save = time.monotonic()
                checkpointer.save(state)
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
        if own:
            stop.restore()
    return exit_code
