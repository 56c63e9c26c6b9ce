"""Setting up an SFT run: a short list of named steps, each returning one object.

`run_sft(cfg)` is what `examples/run_sft.py` and `sftkit sft` call.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from torch import nn

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.checkpointer import Checkpointer, pick_resume_dir, resume_fingerprint
from sftkit.checkpoint.state import seed_everything
from sftkit.config import MasterConfig, config_to_dict
from sftkit.data import PreparedData, load_tokenizer, prepare_data
from sftkit.data.loader import BatchPlan, build_sampler
from sftkit.dist import DistEnv, init_distributed, shutdown_distributed
from sftkit.errors import EXIT_FAILED, EXIT_REQUEUE
from sftkit.lifecycle.lock import ensure_held, take_run_lock
from sftkit.lifecycle.signals import Preempted, StopFlag, preempted_marker, write_preempted_marker
from sftkit.lifecycle.stall import (
    StalledRankError,
    is_collective_timeout,
    report_position,
    stall_report,
)
from sftkit.log import (
    ConsoleReporter,
    Loggers,
    active_matmul_params,
    build_loggers,
    device_peak_flops,
    flops_per_token,
    install_redaction,
    setup_logging,
)
from sftkit.log.plots import curves_at_end
from sftkit.log.rundir import run_exp_dir
from sftkit.model.build import build_model
from sftkit.model.load import DTYPES
from sftkit.model.lora import lora_spec_from_config
from sftkit.parallel_dims import ParallelDims
from sftkit.train.loop import train
from sftkit.train.moe import router_loss_for
from sftkit.train.optim import build_optimizer, build_scheduler
from sftkit.train.state import Run
from sftkit.train.step import StepOptions, supports_chunked_loss
from sftkit.train.validation import Validator

logger = logging.getLogger("sftkit")


# ----------------------------------------------------------------------------- setup steps


def check_before_model(cfg: MasterConfig, env: DistEnv, data: PreparedData) -> None:
    """Settings that cannot work, caught before the (slow) model load."""
    p = cfg.policy
    d = p.dtensor_cfg
    # The same pure function of (config, world size) `init_distributed` built `env.dims` from:
    # callers that make a DistEnv by hand (tests, benches) get the config's layout checked too.
    dims = ParallelDims.from_config(d, env.world_size)
    sizes = ("tensor_parallel_size", "context_parallel_size", "dp_replicate_size",
             "expert_parallel_size")  # fmt: skip
    layout = {k: getattr(d, k) for k in sizes}
    if env.world_size == 1 and any(size > 1 for size in layout.values()):
        logger.warning(
            "policy.dtensor_cfg %s: ignored with one process, which trains the same model "
            "unsharded; launch as many ranks (cluster.gpus_per_node, torchrun) to use them",
            ", ".join(f"{k}={v}" for k, v in layout.items() if v > 1),
        )
    dp = dims.dp
    if p.train_global_batch_size % (p.train_micro_batch_size * dp):
        raise ValueError(
            f"policy.train_global_batch_size={p.train_global_batch_size} is not divisible by "
            f"train_micro_batch_size x data-parallel size = {p.train_micro_batch_size} x {dp}; "
            "change one of them so it divides"
        )
    if cfg.sft.val_period > 0 and not data.validation:
        raise ValueError(
            f"sft.val_period={cfg.sft.val_period} but there is no validation data; set "
            "data.validation, give a train dataset split_validation_size, or set sft.val_period=0"
        )
    if (
        cfg.checkpointing.metric_name
        and cfg.checkpointing.metric_name.startswith("val:")
        and (not data.validation and cfg.checkpointing.enabled and cfg.checkpointing.keep_top_k)
    ):
        logger.warning(
            "checkpointing.metric_name=%s but there is no validation data: checkpoints are "
            "ranked by recency", cfg.checkpointing.metric_name,
        )  # fmt: skip


def batch_plan(cfg: MasterConfig, pad_id: int) -> BatchPlan:
    p = cfg.policy
    packing, dynamic = p.sequence_packing, p.dynamic_batching
    mode = "packed" if packing.enabled else "dynamic" if dynamic.enabled else "padded"
    chosen = packing if packing.enabled else dynamic
    return BatchPlan(
        micro_batch_size=p.train_micro_batch_size,
        multiple_of=p.make_sequence_length_divisible_by or 1,
        pad_id=pad_id,
        mode=mode,
        mb_tokens=chosen.train_mb_tokens,
        length_round=chosen.sequence_length_round,
        algorithm=packing.algorithm,
        seed=cfg.sft.seed,
    )


def setup_optimizer(cfg: MasterConfig, env: DistEnv, model: nn.Module) -> torch.optim.Optimizer:
    """`policy.optimizer` over the model's parameters (fused implementations on CUDA)."""
    o = cfg.policy.optimizer
    return build_optimizer(
        model.parameters(),
        o.name if o else None,
        dict(o.kwargs) if o else None,
        prefer_fused=env.device.type == "cuda" and env.dims.tp == 1,
        bf16_update=cfg.policy.dtensor_cfg.bf16_params_update,
        seed=cfg.sft.seed,
    )


def setup_loggers(cfg: MasterConfig, env: DistEnv, resume_dir: Path | None) -> Loggers:
    """Metric sinks on rank 0 (in `logger.log_dir/exp_NNN/`, the resumed run's own when
    resuming); a no-op elsewhere."""
    if not env.is_main:
        return Loggers()
    exp_dir = run_exp_dir(cfg.logger.log_dir, cfg.checkpointing.checkpoint_dir, resume_dir)
    logger.info("Logging to %s", exp_dir)
    return build_loggers(cfg.logger, exp_dir, config_to_dict(cfg), env.rank)


def setup(cfg: MasterConfig, env: DistEnv) -> Run:
    """Tokenizer -> data -> checks -> resume pick -> model -> optimizer -> loggers -> resume."""
    seed_everything(cfg.sft.seed)
    tokenizer = load_tokenizer(cfg.policy)
    data = prepare_data(cfg, tokenizer, env)
    check_before_model(cfg, env, data)
    fingerprint = resume_fingerprint(cfg, tokenizer, data)
    resume_dir, new_stage = pick_resume_dir(
        cfg.checkpointing, fingerprint, env, cfg.cluster.collective_timeout_s
    )
    model = build_model(cfg, env)
    optimizer = setup_optimizer(cfg, env, model)
    scheduler = build_scheduler(optimizer, cfg.policy.scheduler)
    sampler = build_sampler(
        data.train, cfg.policy.train_global_batch_size, cfg.data.shuffle, cfg.sft.seed
    )
    lora = lora_spec_from_config(cfg.policy)
    checkpointer = Checkpointer(
        cfg=cfg,
        env=env,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        tokenizer=tokenizer,
        lora=lora,
        fingerprint=fingerprint,
        resume_dir=resume_dir,
        new_stage=new_stage,
    )
    loggers = setup_loggers(cfg, env, resume_dir)  # before load: restoring the RNG is the last step
    state = checkpointer.load()
    total_steps = min(cfg.sft.max_num_steps, cfg.sft.max_num_epochs * sampler.batches_per_epoch)
    mean_len = data.train.mean_length()
    plan = batch_plan(cfg, tokenizer.pad_token_id)
    step_opts = StepOptions(
        compute_dtype=DTYPES[cfg.policy.precision],
        max_grad_norm=cfg.policy.max_grad_norm,
        chunked_loss=supports_chunked_loss(model),
        chunk_size=cfg.policy.fused_loss_chunk_size,
        grad_scale=float(env.dims.gradient_divide_factor),
        router=router_loss_for(model, env),
    )
    console = ConsoleReporter(total_steps, state.step, env.rank, cfg.logger.progress_bar)
    validator = Validator(
        cfg, env, model, tokenizer, data.validation, plan, step_opts, loggers, console
    )
    return Run(
        cfg=cfg,
        env=env,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        plan=plan,
        step_opts=step_opts,
        train_examples=data.train,
        validator=validator,
        state=state,
        checkpointer=checkpointer,
        loggers=loggers,
        console=console,
        total_steps=total_steps,
        deadline=ckpt.parse_deadline(cfg.checkpointing.checkpoint_must_save_by),
        flops_per_token=flops_per_token(
            model.config, int(mean_len), lora=lora is not None, n_params=active_matmul_params(model)
        ),
        peak_flops=device_peak_flops(env.device) if env.device.type == "cuda" else None,
    )


def run_sft(cfg: MasterConfig) -> int:
    """The whole run; returns the process exit code (`sftkit.errors`' `EXIT_*`)."""
    timeout_s = cfg.cluster.collective_timeout_s
    env = init_distributed(cfg.cluster.device, cfg.policy.dtensor_cfg, timeout_s)
    setup_logging(env.rank)
    install_redaction()
    c = cfg.checkpointing
    stop = StopFlag(interrupt=True)  # a signal during setup: stop at once, nothing to save
    stop.install()
    lock = None
    step = 0
    code = EXIT_FAILED  # until the run returns or a signal stops it
    try:
        # Write problems surface before the work, and one run owns checkpoint_dir.
        ckpt.check_writable(Path(c.checkpoint_dir), "checkpointing.checkpoint_dir")
        if env.is_main:
            ckpt.check_writable(Path(cfg.logger.log_dir), "logger.log_dir")
        report_position(env, 0, "setup")
        lock = take_run_lock(Path(c.checkpoint_dir), c.take_over_lock, env)
        if env.is_main:
            preempted_marker(Path(c.checkpoint_dir)).unlink(missing_ok=True)
        run = setup(cfg, env)
        run.lock = lock
        try:
            code = train(run, stop)
            step = run.state.step
            if code == 0:
                ensure_held(lock, env)
                run.checkpointer.save_final(step, run.loggers.exp_dir)
                curves_at_end(run.loggers.exp_dir)  # exp_NNN/curves.png (matplotlib: optional)
        finally:
            # An async save in flight is finished before the run lock is released (a run
            # that ended normally or stopped already waited for it: `save(last=True)`).
            run.checkpointer.finish_in_flight()
            run.console.close()
            run.loggers.close()
        env.barrier()
    except Preempted as signalled:
        logger.warning(
            "Stopping during setup (signal %s): nothing to save; start the same command "
            "again (exit code %d)", signal.Signals(signalled.signum).name, EXIT_REQUEUE,
        )  # fmt: skip
        code = EXIT_REQUEUE
    except Exception as err:
        if is_collective_timeout(err):  # one line naming the stalled rank, not gloo's error
            raise StalledRankError(stall_report(env, timeout_s)) from err
        raise
    finally:
        stop.interrupt = False  # a signal from here on must not replace the outcome
        try:
            if lock is not None:
                lock.release()
            # Leaving a gloo/NCCL group alive at interpreter exit can abort the process
            # ("terminate called without an active exception", exit -6) after a good run.
            shutdown_distributed()
        finally:
            # Our handlers stay until the marker is written: a repeated SIGTERM meeting the
            # default handler here ended the process with 143 after it logged 75.
            if code == EXIT_REQUEUE and env.is_main:  # torchrun returns 1: job scripts read it
                write_preempted_marker(preempted_marker(Path(c.checkpoint_dir)), step, "requeue")
            stop.restore(stopped=code == EXIT_REQUEUE)
    return code
