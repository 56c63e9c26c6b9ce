"""GPU utilisation and memory, sampled on a background thread and logged under `gpu/`.

NeMo RL scrapes Ray's Prometheus metrics (`ray/node.{i}.gpu.{j}.util`, `...mem_gb`); sftkit
has no Ray, so it asks NVML directly (pynvml, when importable) and torch's allocator.
Without pynvml it falls back to `torch.cuda.mem_get_info`/`torch.cuda.utilization` on the
training device only, because touching other devices from torch would create a CUDA
context (hundreds of MiB) on each of them.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("sftkit")

_GB = 1024**3


class GpuMonitor:
    """Sample every `collection_interval` seconds; emit averages every `flush_interval`.

    Names: `gpu/{i}/util` (percent), `gpu/{i}/mem_gb`, `gpu/{i}/mem_total_gb` per visible
    device, and `gpu/torch_allocated_gb`, `gpu/torch_reserved_gb`,
    `gpu/torch_peak_allocated_gb` for this process. Utilisation is averaged over the
    flush interval; memory keeps the interval's maximum. A no-op without CUDA.
    """

    def __init__(
        self,
        emit: Callable[[dict[str, float]], None],
        collection_interval: float = 10.0,
        flush_interval: float = 10.0,
        sampler: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self._emit = emit
        self.collection_interval = max(float(collection_interval), 0.01)
        self.flush_interval = max(float(flush_interval), self.collection_interval)
        self._sampler = sampler
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._nvml: Any = None
        self._handles: list[Any] = []

    @property
    def enabled(self) -> bool:
        """True when there is something to sample (CUDA, or an injected sampler)."""
        return self._sampler is not None or self._device is not None

    def start(self) -> None:
        """Start the sampling thread (does nothing when not `enabled`)."""
        if not self.enabled or self._thread is not None:
            return
        if self._sampler is None:
            self._init_nvml()
        self._thread = threading.Thread(target=self._run, name="sftkit-gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and emit what was sampled since the last flush."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.flush()

    def sample(self) -> dict[str, float]:
        """One sample now: `{}` without CUDA."""
        if self._sampler is not None:
            return self._sampler()
        if self._device is None:
            return {}
        metrics = self._torch_process_sample(self._device)
        metrics.update(self._nvml_sample() if self._handles else self._torch_device_sample())
        return metrics

    def flush(self) -> None:
        """Emit the aggregate of the samples taken since the last flush, if any."""
        samples, self._samples = self._samples, []
        if not samples:
            return
        names = {name for s in samples for name in s}
        aggregate = {}
        for name in sorted(names):
            values = [s[name] for s in samples if name in s]
            aggregate[name] = statistics.fmean(values) if name.endswith("/util") else max(values)
        self._emit(aggregate)

    def _run(self) -> None:
        since_flush = 0.0
        while not self._stop.wait(self.collection_interval):
            try:
                self._samples.append(self.sample())
            except Exception as e:  # a monitoring hiccup must never stop training
                log.warning("GPU monitor sample failed (%s); monitoring continues", e)
            since_flush += self.collection_interval
            if since_flush >= self.flush_interval:
                since_flush = 0.0
                self.flush()

    def _init_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [self._nvml_handle(i) for i in range(torch.cuda.device_count())]
        except Exception as e:  # pynvml missing or no driver access: torch fallback
            log.debug("NVML unavailable (%s); GPU monitor uses torch.cuda", e)
            self._nvml, self._handles = None, []

    def _nvml_handle(self, index: int) -> Any:
        # CUDA and NVML number devices differently under CUDA_VISIBLE_DEVICES; the UUID
        # names the same device in both.
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            return self._nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def _nvml_sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for i, handle in enumerate(self._handles):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            metrics[f"gpu/{i}/util"] = float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            metrics[f"gpu/{i}/mem_gb"] = memory.used / _GB
            metrics[f"gpu/{i}/mem_total_gb"] = memory.total / _GB
        return metrics

    def _torch_device_sample(self) -> dict[str, float]:
        index = self._device
        free, total = torch.cuda.mem_get_info(index)
        metrics = {
            f"gpu/{index}/mem_gb": (total - free) / _GB,
            f"gpu/{index}/mem_total_gb": total / _GB,
        }
        try:
            metrics[f"gpu/{index}/util"] = float(torch.cuda.utilization(index))
        except Exception:  # torch needs pynvml (or amdsmi) for utilisation
            pass
        return metrics

    @staticmethod
    def _torch_process_sample(index: int) -> dict[str, float]:
        return {
            "gpu/torch_allocated_gb": torch.cuda.memory_allocated(index) / _GB,
            "gpu/torch_reserved_gb": torch.cuda.memory_reserved(index) / _GB,
            "gpu/torch_peak_allocated_gb": torch.cuda.max_memory_allocated(index) / _GB,
        }
