"""metrics.jsonl, exp_NNN directories, TensorBoard events and the Loggers fan-out."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from sftkit.config.schema import LoggerConfig
from sftkit.log import (
    JsonlSink,
    Loggers,
    MetricSink,
    NullSink,
    TensorboardSink,
    build_loggers,
    next_exp_dir,
    read_jsonl,
)


def test_next_exp_dir_increments_from_001(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    assert next_exp_dir(root) == root / "exp_001"
    assert next_exp_dir(root) == root / "exp_002"
    (root / "exp_041").mkdir()
    (root / "exp_notanumber").mkdir()
    (root / "other").mkdir()
    assert next_exp_dir(root) == root / "exp_042"
    assert (root / "exp_042").is_dir()


def test_next_exp_dir_is_race_safe(tmp_path: Path) -> None:
    results: list[Path] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(next_exp_dir(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in results) == [f"exp_{i:03d}" for i in range(1, 9)]


def test_jsonl_sink_lines_flushed_and_json_safe(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    sink.log({"validation/val_loss": 2.5}, step=0)
    sink.log(
        {
            "train/loss": torch.tensor(1.25),
            "train/global_valid_toks": 321,
            "train/grad_norm": float("nan"),
        },
        step=1,
    )
    # Readable before close: every line is flushed.
    records = read_jsonl(tmp_path / "metrics.jsonl")
    sink.close()
    assert records == [
        {"step": 0, "validation/val_loss": 2.5},
        {"step": 1, "train/loss": 1.25, "train/global_valid_toks": 321, "train/grad_norm": None},
    ]
    assert isinstance(records[1]["train/global_valid_toks"], int)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and text.count("\n") == 2


def test_jsonl_sink_appends(tmp_path: Path) -> None:
    for step in (1, 2):
        sink = JsonlSink(tmp_path)
        sink.log({"train/loss": float(step)}, step)
        sink.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_tensorboard_event_file_has_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorboardSink(tmp_path)
    losses = [2.0, 1.5, 1.125]
    for step, loss in enumerate(losses, start=1):
        sink.log({"train/loss": loss, "train/lr": 1e-4 * step}, step)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx(losses)
    assert acc.Scalars("train/lr")[-1].value == pytest.approx(3e-4)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int]] = []
        self.closed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))

    def close(self) -> None:
        self.closed = True


def test_sinks_follow_the_protocol(tmp_path: Path) -> None:
    assert isinstance(NullSink(), MetricSink)
    assert isinstance(Recorder(), MetricSink)
    jsonl = JsonlSink(tmp_path)
    assert isinstance(jsonl, MetricSink)
    jsonl.close()


def test_loggers_fan_out_and_close_all() -> None:
    a, b = Recorder(), Recorder()
    loggers = Loggers([a, b])
    loggers.log({"train/loss": 1.0}, step=3)
    loggers.log_at_last_step({"gpu/0/util": 50.0})
    loggers.close()
    assert a.calls == b.calls == [({"train/loss": 1.0}, 3), ({"gpu/0/util": 50.0}, 3)]
    assert a.closed and b.closed
    loggers.log({"train/loss": 2.0}, step=4)  # after close: nothing
    assert len(a.calls) == 2


def test_build_loggers_rank0_writes_jsonl_and_tensorboard(tmp_path: Path) -> None:
    cfg = LoggerConfig(tensorboard_enabled=True, wandb_enabled=False, mlflow_enabled=False)
    with build_loggers(cfg, tmp_path, {"sft": {"seed": 1}}, rank=0) as loggers:
        assert loggers.gpu_monitor is None or torch.cuda.is_available()
        loggers.log({"train/loss": 0.5}, step=1)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 0.5}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_build_loggers_off_rank0_is_a_no_op(tmp_path: Path) -> None:
    cfg = LoggerConfig(tensorboard_enabled=True, wandb_enabled=True, mlflow_enabled=True)
    loggers = build_loggers(cfg, tmp_path / "exp", {}, rank=1)
    assert not loggers.enabled and loggers.gpu_monitor is None
    loggers.log({"train/loss": 1.0}, step=1)
    loggers.close()
    assert not (tmp_path / "exp").exists()


def test_build_loggers_without_tensorboard(tmp_path: Path) -> None:
    cfg = LoggerConfig(tensorboard_enabled=False)
    loggers = build_loggers(cfg, tmp_path, {}, rank=0)
    loggers.log({"train/loss": math.pi}, step=1)
    loggers.close()
    assert not (tmp_path / "tensorboard").exists()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["train/loss"] == pytest.approx(math.pi)
