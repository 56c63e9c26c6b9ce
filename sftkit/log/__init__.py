"""Watching a run: metric sinks, the console line, GPU monitoring, MFU and secret redaction.

The loop computes metrics with NeMo RL's names (`train/loss`, `train/grad_norm`, `train/lr`,
`train/global_valid_seqs`, `train/global_valid_toks`, `train/num_unmasked_tokens`,
`train/num_valid_samples`, `timing/train/total_step_time`,
`timing/train/valid_tokens_per_sec_per_gpu`, `validation/val_loss`,
`timing/validation/total_validation_time`, `train/mfu`) and hands them to:

    exp_dir = next_exp_dir(cfg.logger.log_dir)            # rank 0
    loggers = build_loggers(cfg.logger, exp_dir, config_dict, rank)
    console = ConsoleReporter(total_steps, start_step, rank, cfg.logger.progress_bar)
    loggers.log(metrics, step); console.step(step, metrics)
    console.close(); loggers.close()
"""

from typing import TYPE_CHECKING, Any

from sftkit.log.console import (
    ConsoleReporter,
    format_eta,
    format_step_line,
    format_validation_line,
    setup_logging,
)
from sftkit.log.redact import (
    REDACTED,
    RedactingFilter,
    install_redaction,
    is_secret_name,
    redact,
    scrub,
)
from sftkit.log.sinks import (
    JsonlSink,
    MetricSink,
    NullSink,
    TensorboardSink,
    next_exp_dir,
    read_jsonl,
)
from sftkit.log.trackers import MlflowSink, WandbSink, check_reachable, flatten

if TYPE_CHECKING:
    from sftkit.log.flops import (
        active_matmul_params,
        device_peak_flops,
        flops_per_token,
        matmul_params,
        mfu,
        peak_flops,
        throughput_metrics,
    )
    from sftkit.log.gpu import GpuMonitor
    from sftkit.log.loggers import Loggers, build_loggers

# These modules import torch (1.5 CPU-s): loaded on first use, so the config path
# (`--print-config`, a config error, `sftkit keys`) answers without it.
_LAZY = {
    **dict.fromkeys(
        (
            "active_matmul_params",
            "device_peak_flops",
            "flops_per_token",
            "matmul_params",
            "mfu",
            "peak_flops",
            "throughput_metrics",
        ),
        "sftkit.log.flops",
    ),  # fmt: skip
    "GpuMonitor": "sftkit.log.gpu",
    "Loggers": "sftkit.log.loggers",
    "build_loggers": "sftkit.log.loggers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sftkit.log' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "REDACTED",
    "ConsoleReporter",
    "GpuMonitor",
    "JsonlSink",
    "Loggers",
    "MetricSink",
    "MlflowSink",
    "NullSink",
    "RedactingFilter",
    "TensorboardSink",
    "WandbSink",
    "build_loggers",
    "check_reachable",
    "device_peak_flops",
    "flatten",
    "active_matmul_params",
    "flops_per_token",
    "format_eta",
    "format_step_line",
    "format_validation_line",
    "install_redaction",
    "is_secret_name",
    "matmul_params",
    "mfu",
    "throughput_metrics",
    "next_exp_dir",
    "peak_flops",
    "read_jsonl",
    "redact",
    "scrub",
    "setup_logging",
]
