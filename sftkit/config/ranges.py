"""The allowed range of every numeric key sftkit acts on, checked once at config load.

A value outside its range fails loading with one line per key naming the key, the value and
the range. Without this, `policy.max_grad_norm=-1` flipped every gradient (loss 5.95 -> 6.95
in six steps, exit 0), `sft.max_num_steps=-3` wrote an untrained `final_hf` and
`sft.val_global_batch_size=0` failed after the model loaded with `range() arg 3 must not be
zero`. NeMo RL's sentinels keep their meaning: `-1`/`0` periods disable (`val_period`,
`save_period`), `val_batches <= 0` is the whole set, `null` is "not set" where the field is
optional. Keys sftkit ignores (`IGNORED_KEYS`) are not checked here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sftkit.config.checks import raise_problems
from sftkit.config.schema import DERIVED_DEFAULTS, TOKEN_BUDGET_KEYS

_MISSING = object()
# A derived key (`data.max_input_seq_length: ${policy.max_total_sequence_length}`) is not
# reported again when the key it comes from is already out of range: one line per mistake.
_DERIVED_FROM = {
    **DERIVED_DEFAULTS,
    **dict.fromkeys(TOKEN_BUDGET_KEYS, "policy.max_total_sequence_length"),
    "policy.make_sequence_length_divisible_by": "policy.dtensor_cfg.tensor_parallel_size",
    "data.max_row_chars": "data.max_input_seq_length",  # null: 8 characters a token
}
_INT_MAX = 2**31 - 1  # counts become tensor sizes and indexes: int32 at most


@dataclass(frozen=True)
class Range:
    """`low <= value <= high` (`low_open`: `low < value`); `what` ends the message."""

    low: float
    high: float = math.inf
    what: str = ""
    low_open: bool = False
    integer: bool = True

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):  # NaN and inf fail every range
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        high = f" and <= {self.high:g}" if math.isfinite(self.high) else ""
        return f"{kind} {low}{high}"


def _count(what: str, high: float = _INT_MAX) -> Range:
    return Range(1, high, what)


def _real(low: float, high: float = math.inf, what: str = "", low_open: bool = False) -> Range:
    return Range(low, high, what, low_open=low_open, integer=False)


_PERIOD = "; 0 or -1 disables it"
_LORA = {
    "dim": _count("the LoRA rank", 2**16),
    "alpha": _real(0, what="the LoRA scale is alpha / dim", low_open=True),
    "dropout": _real(0, 0.999, "a dropout probability"),
    "quantize_block_size": _count("weights per NF4 scale", 2**16),
    "quantize_scaler_block_size": _count("NF4 scales per double-quantization block", 2**16),
}

# Dotted path -> range. A path through a list or free-form mapping (`kwargs.betas.0`) is
# checked when the value is present; `null` passes where the schema allows it.
RANGES: dict[str, Range] = {
    "sft.max_num_epochs": _count("passes over the training data"),
    "sft.max_num_steps": _count(
        "optimizer steps; training stops at the smaller of this and max_num_epochs passes"
    ),
    "sft.val_period": Range(-1, _INT_MAX, "steps between validations" + _PERIOD),
    "sft.val_batches": Range(-1, _INT_MAX, "validation batches; 0 or -1 means the whole set"),
    "sft.val_global_batch_size": _count("examples per validation batch"),
    "sft.val_micro_batch_size": _count("examples per validation forward pass"),
    "sft.seed": Range(0, 2**32 - 1, "NumPy's seed range"),
    "checkpointing.keep_top_k": _count("best checkpoints kept; null keeps all"),
    "checkpointing.save_period": Range(-1, _INT_MAX, "steps between saves" + _PERIOD),
    "checkpointing.ft_save_period": Range(
        0, _INT_MAX, "steps between extra saves; 0 or null disables it"
    ),
    "checkpointing.ft_keep_latest_k": Range(0, _INT_MAX, "latest checkpoints always kept"),
    "policy.train_global_batch_size": _count("examples per optimizer step"),
    "policy.train_micro_batch_size": _count("examples per forward pass"),
    "policy.max_total_sequence_length": _count("tokens per example", 2**24),
    "policy.make_sequence_length_divisible_by": _count("a padding multiple", 2**16),
    "policy.max_grad_norm": _real(0, what="the clipping norm; 0 or null disables clipping"),
    "policy.fused_loss_chunk_size": _count("tokens per loss chunk", 2**24),
    "policy.dtensor_cfg.tensor_parallel_size": _count("ranks per model shard", 2**16),
    "policy.dtensor_cfg.context_parallel_size": _count("ranks per sequence", 2**16),
    "policy.dtensor_cfg.dp_replicate_size": _count("HSDP replicas", 2**16),
    **{f"policy.dtensor_cfg.lora_cfg.{k}": r for k, r in _LORA.items()},
    **{f"policy.megatron_cfg.peft.{k}": r for k, r in _LORA.items()},
    "policy.dynamic_batching.train_mb_tokens": _count("tokens per micro-batch"),
    "policy.dynamic_batching.sequence_length_round": _count("a rounding multiple", 2**16),
    "policy.sequence_packing.train_mb_tokens": _count("tokens per packed micro-batch"),
    "policy.sequence_packing.sequence_length_round": _count("a rounding multiple", 2**16),
    # A negative learning rate trains uphill; a negative weight decay grows the weights.
    # (megatron_cfg.optimizer.clip_grad is checked as policy.max_grad_norm, derived from it.)
    "policy.optimizer.kwargs.lr": _real(0, 3.4e38, "the learning rate"),
    "policy.optimizer.kwargs.weight_decay": _real(0, 3.4e38, "the weight decay"),
    "policy.optimizer.kwargs.eps": _real(0, 3.4e38, "the optimizer's epsilon", low_open=True),
    "policy.optimizer.kwargs.momentum": _real(0, 1, "the momentum"),
    "policy.optimizer.kwargs.betas.0": _real(0, 0.999999, "Adam's beta1"),
    "policy.optimizer.kwargs.betas.1": _real(0, 0.999999, "Adam's beta2"),
    "policy.megatron_cfg.optimizer.lr": _real(0, 3.4e38, "the learning rate"),
    "policy.megatron_cfg.optimizer.min_lr": _real(0, 3.4e38, "the final learning rate"),
    "policy.megatron_cfg.optimizer.weight_decay": _real(0, 3.4e38, "the weight decay"),
    "policy.megatron_cfg.optimizer.adam_beta1": _real(0, 0.999999, "Adam's beta1"),
    "policy.megatron_cfg.optimizer.adam_beta2": _real(0, 0.999999, "Adam's beta2"),
    "policy.megatron_cfg.optimizer.adam_eps": _real(0, 3.4e38, "Adam's epsilon", low_open=True),
    "policy.megatron_cfg.optimizer.sgd_momentum": _real(0, 1, "the momentum"),
    "policy.megatron_cfg.scheduler.lr_warmup_iters": Range(0, _INT_MAX, "warmup steps"),
    "policy.megatron_cfg.scheduler.lr_decay_iters": Range(0, _INT_MAX, "decay steps"),
    "policy.megatron_cfg.scheduler.lr_warmup_init": _real(0, 3.4e38, "the first learning rate"),
    "data.max_input_seq_length": _count("tokens per example", 2**24),
    "data.num_workers": Range(0, 4096, "tokenization worker processes"),
    "data.max_row_chars": _count("characters per row"),
    "data.prepare_timeout_s": _real(0, 30 * 86400, "seconds", low_open=True),
    "logger.num_val_samples_to_print": Range(0, 2**20, "validation rows sampled"),
    "logger.val_sample_max_new_tokens": _count("new tokens per sample", 2**20),
    "logger.gpu_monitoring.collection_interval": _real(0, 86400, "seconds", low_open=True),
    "logger.gpu_monitoring.flush_interval": _real(0, 86400, "seconds", low_open=True),
    "cluster.gpus_per_node": _count("ranks per node", 1024),
    "cluster.num_nodes": _count("nodes", 2**16),
    "cluster.collective_timeout_s": _count("seconds a collective may wait", 7 * 86400),
}


def _value(cfg: Any, path: str) -> Any:
    node = cfg
    for seg in path.split("."):
        if isinstance(node, dict):
            node = node.get(seg, _MISSING)
        elif isinstance(node, (list, tuple)):
            node = node[int(seg)] if seg.isdigit() and int(seg) < len(node) else _MISSING
        else:
            node = getattr(node, seg, _MISSING)
        if node is _MISSING or node is None:
            return node
    return node


def range_problems(cfg: Any) -> list[tuple[str, str]]:
    """(path, one-line message) for each numeric key of `cfg` outside its range."""
    problems = []
    for path, allowed in RANGES.items():
        value = _value(cfg, path)
        if value is _MISSING or value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and allowed.integer and isinstance(value, float) and not value.is_integer():
            number = False
        if not number or not allowed.allows(float(value)):
            problems.append(
                (path, f"{path} is {value!r}; it must be {allowed.describe()} ({allowed.what}).")
            )
    bad = {path for path, _ in problems}
    return [(path, msg) for path, msg in problems if _DERIVED_FROM.get(path) not in bad]


def check_ranges(cfg: Any, sources: dict[str, str] | None = None) -> None:
    """Raise one ConfigError listing every key of `cfg` outside its range (see `RANGES`)."""
    raise_problems(range_problems(cfg), sources or {})
