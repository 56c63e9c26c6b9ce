"""Setting up an SFT run: a short list of named steps, each returning one object.

`run_sft(cfg)` is what `examples/run_sft.py` and `sftkit sft` call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftkit.batch import PackedBatch
from sftkit.config import MasterConfig, config_to_dict, config_to_yaml
from sftkit.data import PreparedData, load_tokenizer, prepare_data
from sftkit.data.loader import BatchPlan, GlobalBatchSampler, iterate_eval_batches, micro_batches
from sftkit.data.types import Example
from sftkit.dist import (
    DistEnv,
    init_distributed,
    load_full_optimizer_state,
    load_sharded,
    parallel_layout,
    save_sharded,
    shutdown_distributed,
)
from sftkit.log import (
    ConsoleReporter,
    Loggers,
    build_loggers,
    device_peak_flops,
    flops_per_token,
    install_redaction,
    mfu,
    next_exp_dir,
    setup_logging,
)
from sftkit.model.attention import enable_packed_attention
from sftkit.model.fused import apply_fused_kernels
from sftkit.model.load import DTYPES, load_model, load_model_weights, save_hf, save_model_weights
from sftkit.model.lora import LoraSpec, apply_lora, lora_spec_from_config, merge_lora, save_adapter
from sftkit.model.parallel import build_sharded_model, load_sharded_weights, parallelize
from sftkit.train import checkpoint as ckpt
from sftkit.train.export import gather_hf
from sftkit.train.loop import train
from sftkit.train.optim import build_optimizer, build_scheduler
from sftkit.train.state import TrainState, rng_state, seed_everything, set_rng_state
from sftkit.train.step import StepOptions, supports_chunked_loss, validation_loss

logger = logging.getLogger("sftkit")


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: MasterConfig
    env: DistEnv
    tokenizer: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: GlobalBatchSampler
    plan: BatchPlan
    step_opts: StepOptions
    train_examples: list[Example]
    val_examples: list[Example]
    state: TrainState
    loggers: Loggers
    console: ConsoleReporter
    lora: LoraSpec | None
    fingerprint: dict[str, Any]
    total_steps: int
    deadline: float | None
    flops_per_token: float | None
    peak_flops: float | None

    @property
    def has_validation(self) -> bool:
        return bool(self.val_examples)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.checkpointing.checkpoint_dir)

    def validate(self, step: int) -> float:
        """Validation loss over `sft.val_batches` batches; logged at `step`."""
        t0 = time.monotonic()
        sft = self.cfg.sft
        plan = BatchPlan(
            micro_batch_size=sft.val_micro_batch_size,
            multiple_of=self.plan.multiple_of,
            pad_id=self.plan.pad_id,
        )
        batches: list[PackedBatch] = []
        for examples in iterate_eval_batches(
            self.val_examples, sft.val_global_batch_size, sft.val_batches
        ):
            share = examples[self.env.dp_rank :: self.env.dp_size]
            batches += micro_batches(share, plan) if share else []
        val_loss, _ = validation_loss(self.model, batches, self.step_opts, self.env)
        metrics = {
            "validation/val_loss": val_loss,
            "timing/validation/total_validation_time": time.monotonic() - t0,
        }
        self.state.metrics.update(ckpt.ranking_metric(self.cfg.checkpointing.metric_name, metrics))
        self.loggers.log(metrics, step)
        self.console.validation(step, metrics)
        return val_loss

    def should_save(self, step: int, last_step: bool) -> bool:
        c = self.cfg.checkpointing
        if not c.enabled:
            return False
        periodic = c.save_period > 0 and step % c.save_period == 0
        ft = bool(c.ft_save_period) and step % c.ft_save_period == 0  # type: ignore[operator]
        return last_step or periodic or ft

    def save(self) -> Path:
        """An atomic checkpoint of everything the next step depends on, then retention."""
        c = self.cfg.checkpointing
        self.state.epoch = self.sampler.epoch
        info = {
            **self.state.to_json(),
            "format_version": ckpt.FORMAT_VERSION,
            "fingerprint": self.fingerprint,
        }

        def write_files(directory: Path) -> None:
            rank, sharded = self.env.rank, self.env.world_size > 1
            (directory / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), directory / "rng" / f"rank_{rank}.pt")
            if sharded:  # every rank writes its shards (policy/dcp, torch.distributed.checkpoint)
                optimizer = self.optimizer if c.save_optimizer else None
                save_sharded(
                    self.model, optimizer, directory / "policy" / "dcp", self.lora is not None
                )
                if c.save_consolidated:
                    export_hf(self, directory / "policy" / "consolidated", merge=False)
            if rank != 0:
                return
            (directory / "config.yaml").write_text(config_to_yaml(self.cfg))
            torch.save(self.sampler.state_dict(), directory / "train_dataloader.pt")
            opt_dir = directory / "policy" / "optimizer"
            if c.save_optimizer:
                opt_dir.mkdir(parents=True, exist_ok=True)
                torch.save(self.scheduler.state_dict(), opt_dir / "scheduler.pt")
            if not sharded:
                save_model_weights(
                    self.model,
                    directory / "policy" / "weights",
                    trainable_only=self.lora is not None,
                )
                if c.save_optimizer:
                    torch.save(self.optimizer.state_dict(), opt_dir / "optimizer.pt")
            self.tokenizer.save_pretrained(directory / "policy" / "tokenizer")
            if c.save_consolidated and not sharded:
                export_hf(self, directory / "policy" / "consolidated", merge=False)

        path = ckpt.save_checkpoint(
            self.checkpoint_dir, self.state.step, info, write_files, self.env.rank, self.env.barrier
        )
        if self.env.is_main:
            ckpt.apply_retention(
                self.checkpoint_dir, c.metric_name, c.keep_top_k, c.higher_is_better,
                c.ft_keep_latest_k,
            )  # fmt: skip
            logger.info("Saved checkpoint %s", path)
        return path

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


def export_hf(run: Run, directory: Path, merge: bool) -> None:
    """HF directory of the current weights; LoRA runs merge (in place only when `merge`).

    Sharded runs gather the full weights to rank 0 (collective: every rank calls)."""
    if run.env.world_size > 1:
        gather_hf(run.model, run.tokenizer, directory, run.env.is_main, merge_lora=True)
        return
    if run.lora is None:
        save_hf(run.model, run.tokenizer, directory)
        return
    if merge:
        merge_lora(run.model)
        save_hf(run.model, run.tokenizer, directory)
        return
    import copy

    merged = copy.deepcopy(run.model)
    merge_lora(merged)
    save_hf(merged, run.tokenizer, directory)


# ----------------------------------------------------------------------------- setup steps


def check_before_model(cfg: MasterConfig, env: DistEnv, data: PreparedData) -> None:
    """Settings that cannot work, caught before the (slow) model load."""
    p = cfg.policy
    d = p.dtensor_cfg
    tp, _ = parallel_layout(
        env.world_size, d.tensor_parallel_size, d.dp_replicate_size, d.context_parallel_size
    )
    sizes = ("tensor_parallel_size", "context_parallel_size", "dp_replicate_size")
    layout = {k: getattr(d, k) for k in sizes}
    if env.world_size == 1 and any(size > 1 for size in layout.values()):
        logger.warning(
            "policy.dtensor_cfg %s: ignored with one process, which trains the same model "
            "unsharded; launch as many ranks (cluster.gpus_per_node, torchrun) to use them",
            ", ".join(f"{k}={v}" for k, v in layout.items() if v > 1),
        )
    dp = env.world_size // tp
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


def data_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(len(e.input_ids).to_bytes(4, "little"))
        digest.update(torch.tensor(e.input_ids, dtype=torch.int32).numpy().tobytes())
        digest.update(bytes(e.loss_mask))
    return digest.hexdigest()[:16]


def resume_fingerprint(cfg: MasterConfig, tokenizer: Any, data: PreparedData) -> dict[str, Any]:
    """What makes resuming meaningful (micro-batch size is left out: it cannot change the
    loss or the gradient, so changing it to fit memory is allowed)."""
    p = cfg.policy
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "model": p.model_name,
        "tokenizer": p.tokenizer.name,
        "chat_template_sha": hashlib.sha256(str(template).encode()).hexdigest()[:16],
        "lora": asdict(p.dtensor_cfg.lora_cfg) if p.dtensor_cfg.lora_cfg.enabled else None,
        "megatron_peft": asdict(p.megatron_cfg.peft) if p.megatron_cfg.enabled else None,
        "train_data": data_fingerprint(data.train),
        "train_global_batch_size": p.train_global_batch_size,
        "max_total_sequence_length": p.max_total_sequence_length,
        "seed": cfg.sft.seed,
        "shuffle": cfg.data.shuffle,
    }


def find_resume_dir(cfg: MasterConfig, fingerprint: dict[str, Any], env: DistEnv) -> Path | None:
    """The checkpoint to resume from, or None (after moving old ones aside if starting fresh)."""
    c = cfg.checkpointing
    if not c.enabled:
        return None
    directory = Path(c.checkpoint_dir)
    latest = ckpt.latest_checkpoint(directory)
    if latest is not None and c.resume:
        try:
            ckpt.check_resumable(latest, fingerprint)
            return latest
        except ckpt.ResumeMismatchError:
            if c.resume_mismatch != "fresh":
                raise
            logger.warning("Checkpoint %s does not match this run: starting fresh", latest)
    if env.is_main and ckpt.step_dirs(directory):
        ckpt.archive_old_checkpoints(directory)
    env.barrier()
    return None


def setup_model(cfg: MasterConfig, env: DistEnv) -> tuple[nn.Module, LoraSpec | None, float]:
    """HF model -> LoRA -> parallel transforms; returns (model, LoRA spec, grad scale)."""
    p = cfg.policy
    param_dtype = DTYPES[p.precision] if p.dtensor_cfg.bf16_params else torch.float32
    if env.world_size > 1:  # sharded from the start: built on meta, each rank loads its shards
        spec = lora_spec_from_config(p)
        model, grad_scale = build_sharded_model(cfg, env, spec, param_dtype)
        return model, spec, grad_scale
    model = load_model(
        p.model_name,
        param_dtype=param_dtype,
        trust_remote_code=p.trust_remote_code,
        attn_implementation=p.attn_implementation,
        config_overrides=dict(p.hf_config_overrides or {}),
    )
    spec = lora_spec_from_config(p)
    if spec is not None:
        names = apply_lora(model, spec)
        logger.info("LoRA on %d modules (rank %d, alpha %s)", len(names), spec.dim, spec.alpha)
    model, grad_scale = parallelize(model, cfg, env)
    return model, spec, grad_scale


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


def restore(run: Run, directory: Path) -> None:
    """Load model, optimizer, scheduler, data position, RNG and counters from `directory`.

    Checkpoints of any rank count load into any other: sharded ones (policy/dcp) are
    resharded by torch.distributed.checkpoint, one-process ones are sliced per rank.
    """
    opt_dir, sharded = directory / "policy" / "optimizer", directory / "policy" / "dcp"
    with_optimizer = (opt_dir / "scheduler.pt").exists()
    if sharded.is_dir():
        optimizer = run.optimizer if with_optimizer else None
        load_sharded(run.model, optimizer, sharded, trainable_only=run.lora is not None)
    elif run.env.world_size > 1:
        files = sorted((directory / "policy" / "weights").glob("*.safetensors"))
        load_sharded_weights(run.model, files, lambda name: run.lora is None or ".lora_" in name)
        if with_optimizer:
            load_full_optimizer_state(run.model, run.optimizer, opt_dir / "optimizer.pt")
    else:
        load_model_weights(run.model, directory / "policy" / "weights")
        if with_optimizer:
            run.optimizer.load_state_dict(torch.load(opt_dir / "optimizer.pt", weights_only=True))
    if with_optimizer:
        run.scheduler.load_state_dict(torch.load(opt_dir / "scheduler.pt", weights_only=True))
    else:
        logger.warning(
            "%s has no optimizer state (save_optimizer=false): fresh optimizer", directory
        )
    run.sampler.load_state_dict(torch.load(directory / "train_dataloader.pt", weights_only=True))
    rng_file = directory / "rng" / f"rank_{run.env.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    run.state = TrainState.from_json(ckpt.read_info(directory))
    logger.info("Resumed from %s at step %d", directory, run.state.step)


def setup(cfg: MasterConfig, env: DistEnv) -> Run:
    """Tokenizer -> data -> checks -> model -> optimizer -> resume -> loggers."""
    seed_everything(cfg.sft.seed)
    tokenizer = load_tokenizer(cfg.policy)
    data = prepare_data(cfg, tokenizer)
    logger.info("Data: %s", ", ".join(f"{k}={v}" for k, v in sorted(data.report.items())))
    check_before_model(cfg, env, data)
    fingerprint = resume_fingerprint(cfg, tokenizer, data)
    resume_dir = find_resume_dir(cfg, fingerprint, env)

    model, lora, grad_scale = setup_model(cfg, env)
    d = cfg.policy.dtensor_cfg
    if env.device.type == "cuda" and d.fused_kernels and not d.compile:
        fused = apply_fused_kernels(model, device=env.device)
        logger.info("Fused kernels: %s", ", ".join(fused) or "none for this model")
    plan = batch_plan(cfg, tokenizer.pad_token_id)
    if plan.mode == "packed":
        backend = enable_packed_attention(model)
        logger.info("Sequence packing: documents isolated by %s attention", backend)
    optimizer = build_optimizer(
        model.parameters(),
        cfg.policy.optimizer.name if cfg.policy.optimizer else None,
        dict(cfg.policy.optimizer.kwargs) if cfg.policy.optimizer else None,
        prefer_fused=env.device.type == "cuda" and env.tp_size == 1,
        bf16_update=d.bf16_params_update,
        seed=cfg.sft.seed,
    )
    scheduler = build_scheduler(optimizer, cfg.policy.scheduler)
    sampler = GlobalBatchSampler(
        len(data.train), cfg.policy.train_global_batch_size, cfg.data.shuffle, cfg.sft.seed
    )
    total_steps = min(cfg.sft.max_num_steps, cfg.sft.max_num_epochs * sampler.batches_per_epoch)
    exp_dir = next_exp_dir(cfg.logger.log_dir) if env.is_main else None
    mean_len = sum(len(e.input_ids) for e in data.train) / len(data.train)
    run = Run(
        cfg=cfg,
        env=env,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        plan=plan,
        step_opts=StepOptions(
            compute_dtype=DTYPES[cfg.policy.precision],
            max_grad_norm=cfg.policy.max_grad_norm,
            chunked_loss=supports_chunked_loss(model),
            chunk_size=cfg.policy.fused_loss_chunk_size,
            grad_scale=grad_scale,
        ),
        train_examples=data.train,
        val_examples=data.validation,
        state=TrainState(),
        loggers=build_loggers(cfg.logger, exp_dir, config_to_dict(cfg), env.rank)
        if exp_dir
        else Loggers(),
        console=ConsoleReporter(0, 0, env.rank, cfg.logger.progress_bar),
        lora=lora,
        fingerprint=fingerprint,
        total_steps=total_steps,
        deadline=ckpt.parse_deadline(cfg.checkpointing.checkpoint_must_save_by),
        flops_per_token=flops_per_token(model.config, int(mean_len), lora=lora is not None),
        peak_flops=device_peak_flops(env.device) if env.device.type == "cuda" else None,
    )
    if resume_dir is not None:
        restore(run, resume_dir)
    run.console.close()
    run.console = ConsoleReporter(total_steps, run.state.step, env.rank, cfg.logger.progress_bar)
    if exp_dir is not None:
        logger.info("Logging to %s", exp_dir)
    return run


def finish(run: Run) -> None:
    """Write `final_hf/` (and `final_adapter/` for LoRA) under the checkpoint directory."""
    out = Path(run.cfg.checkpointing.checkpoint_dir)
    if run.lora is not None:
        save_adapter(run.model, out / "final_adapter", run.cfg.policy.model_name, run.lora)
    if run.env.is_main or run.env.world_size > 1:  # sharded: every rank takes part in the gather
        export_hf(run, out / "final_hf", merge=True)
    if run.env.is_main:
        logger.info("Final model: %s", out / "final_hf")
    run.env.barrier()


def run_sft(cfg: MasterConfig) -> int:
    """The whole run; returns the process exit code (see `sftkit.train.loop`)."""
    env = init_distributed(cfg.cluster.device)
    setup_logging(env.rank)
    install_redaction()
    try:
        run = setup(cfg, env)
        try:
            code = train(run)
            if code == 0:
                finish(run)
        finally:
            run.console.close()
            run.loggers.close()
        env.barrier()
    finally:
        # Leaving a gloo/NCCL group alive at interpreter exit can abort the process
        # ("terminate called without an active exception", exit -6) after a good run.
        shutdown_distributed()
    return code
