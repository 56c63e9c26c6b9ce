"""One object the training loop logs to: fan-out to the enabled sinks, on rank 0 only."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sftkit.log.gpu import GpuMonitor
from sftkit.log.sinks import JsonlSink, MetricSink, TensorboardSink
from sftkit.log.trackers import MlflowSink, WandbSink

if TYPE_CHECKING:  # config imports log (redaction): no runtime import back
    from sftkit.config.schema import LoggerConfig

VAL_SAMPLES_FILE = "val_samples.jsonl"  # beside metrics.jsonl


class Loggers:
    """Send each `log(metrics, step)` to every sink; with no sinks it does nothing.

    Thread-safe, so the GPU monitor can log from its thread; its lines carry the last
    step the loop logged.
    """

    def __init__(self, sinks: list[MetricSink] | None = None, exp_dir: Path | None = None) -> None:
        self.sinks: list[MetricSink] = list(sinks or [])
        self.exp_dir = exp_dir
        self.gpu_monitor: GpuMonitor | None = None
        self.last_step = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log flat metrics (`train/loss`, ...) at optimizer step `step` to every sink."""
        if not self.sinks or not metrics:
            return
        with self._lock:
            self.last_step = max(self.last_step, step)
            for sink in self.sinks:
                sink.log(metrics, step)

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        """Validation samples: appended to `exp_dir/val_samples.jsonl` and handed to every
        sink that shows text (`log_samples`: wandb table, TensorBoard text)."""
        if self.exp_dir is None or not records:
            return
        with self._lock:
            with (self.exp_dir / VAL_SAMPLES_FILE).open("a") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            for sink in self.sinks:
                log_samples = getattr(sink, "log_samples", None)
                if log_samples is not None:
                    log_samples(records, step)

    def log_at_last_step(self, metrics: dict[str, float]) -> None:
        """Log at the last step seen (for metrics sampled off the step, like GPU memory)."""
        self.log(metrics, self.last_step)

    def close(self) -> None:
        """Stop the GPU monitor (flushing it) and close every sink, even if one fails."""
        if self.gpu_monitor is not None:
            self.gpu_monitor.stop()
            self.gpu_monitor = None
        errors = []
        with self._lock:
            sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:  # close the others before reporting
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loggers(
    cfg: LoggerConfig, exp_dir: Path, config_dict: dict[str, Any], rank: int = 0
) -> Loggers:
    """The sinks `cfg` enables, writing in `exp_dir`; a no-op off rank 0.

    Always: `metrics.jsonl`. Then TensorBoard (always in `exp_dir/tensorboard`, as NeMo RL
    does whatever `tensorboard.log_dir` says), wandb and MLflow as enabled (`config_dict`,
    the resolved run config, is passed to the trackers redacted), and the GPU monitor when
    `monitor_gpus` is on and CUDA is available. A sink that fails to start (a missing
    package, an unreachable MLflow server) raises after the others are closed.
    """
    if rank != 0:
        return Loggers()
    exp_dir = Path(exp_dir)
    loggers = Loggers(exp_dir=exp_dir)
    try:
        loggers.sinks.append(JsonlSink(exp_dir))
        if cfg.tensorboard_enabled:
            loggers.sinks.append(TensorboardSink(exp_dir))
        if cfg.wandb_enabled:
            wandb_cfg = cfg.wandb
            loggers.sinks.append(
                WandbSink(
                    exp_dir,
                    config_dict,
                    project=wandb_cfg.project,
                    name=wandb_cfg.name,
                    entity=wandb_cfg.entity,
                    mode=wandb_cfg.mode,
                )
            )
        if cfg.mlflow_enabled:
            loggers.sinks.append(
                MlflowSink(
                    exp_dir,
                    config_dict,
                    experiment_name=cfg.mlflow.experiment_name,
                    run_name=cfg.mlflow.run_name,
                    tracking_uri=cfg.mlflow.tracking_uri,
                )
            )
    except BaseException:
        loggers.close()
        raise
    if cfg.monitor_gpus and torch.cuda.is_available():
        monitoring = cfg.gpu_monitoring
        loggers.gpu_monitor = GpuMonitor(
            loggers.log_at_last_step,
            collection_interval=monitoring.collection_interval,
            flush_interval=monitoring.flush_interval,
        )
        loggers.gpu_monitor.start()
    return loggers
