"""The GPU monitor's thread, aggregation and no-op without CUDA (a fake sampler on CPU)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from sftkit.log import GpuMonitor, Loggers


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))

    def close(self) -> None:
        pass


def test_aggregates_util_mean_and_memory_max() -> None:
    samples = iter(
        [
            {"gpu/0/util": 10.0, "gpu/0/mem_gb": 3.0},
            {"gpu/0/util": 30.0, "gpu/0/mem_gb": 5.0},
            {"gpu/0/util": 50.0, "gpu/0/mem_gb": 4.0},
        ]
    )
    emitted: list[dict[str, float]] = []
    monitor = GpuMonitor(emitted.append, sampler=lambda: next(samples))
    for _ in range(3):
        monitor._samples.append(monitor.sample())
    monitor.flush()
    monitor.flush()  # nothing new: nothing emitted
    assert emitted == [{"gpu/0/mem_gb": 5.0, "gpu/0/util": 30.0}]


def test_thread_samples_and_logs_at_the_loop_step() -> None:
    counter = itertools.count()
    recorder = Recorder()
    loggers = Loggers([recorder])
    loggers.log({"train/loss": 1.0}, step=7)
    monitor = GpuMonitor(
        loggers.log_at_last_step,
        collection_interval=0.01,
        flush_interval=0.03,
        sampler=lambda: {"gpu/0/util": float(next(counter))},
    )
    loggers.gpu_monitor = monitor
    monitor.start()
    deadline = time.monotonic() + 5
    while len(recorder.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    loggers.close()  # stops the thread and flushes
    gpu_calls = [(m, s) for m, s in recorder.calls if "gpu/0/util" in m]
    assert len(gpu_calls) >= 2
    assert all(step == 7 for _, step in gpu_calls)
    values = [m["gpu/0/util"] for m, _ in gpu_calls]
    assert values == sorted(values) and len(set(values)) == len(values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU no-op")
def test_no_op_without_cuda() -> None:
    emitted: list[dict[str, float]] = []
    monitor = GpuMonitor(emitted.append, collection_interval=0.01)
    assert not monitor.enabled
    assert monitor.sample() == {}
    monitor.start()
    assert monitor._thread is None
    monitor.stop()
    assert emitted == []
