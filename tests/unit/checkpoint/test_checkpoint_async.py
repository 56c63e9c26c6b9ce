"""`checkpointing.is_async` on one process: `save` returns once the state is copied, a
background thread writes, hashes and publishes it; at most one save is in flight and its
failure is raised on the training thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint_checkpointer import checkpointer, train_one_step

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.checkpointer import Checkpointer
from sftkit.checkpoint.layout import StepDir
from sftkit.checkpoint.state import TrainState
from sftkit.checkpoint.weights import load_model_weights
from sftkit.config import ignored_settings, load_config

ASYNC = "checkpointing.is_async=true"


class Gate:
    """A part whose write waits for `opened` (or raises `error`): the save stays in flight."""

    def __init__(self, error: Exception | None = None) -> None:
        self.opened = threading.Event()
        self.error = error

    def save(self, step: StepDir, rank: int, shards: dict[str, Any]) -> None:
        raise AssertionError("an async save stages its parts")

    def stage(self, step: StepDir, rank: int, shards: dict[str, Any]) -> Any:
        def write() -> None:
            assert self.opened.wait(60)
            if self.error is not None:
                raise self.error
            step.part("gate").parent.mkdir(parents=True, exist_ok=True)
            step.part("gate").write_text("written")

        return write

    def load(self, step: StepDir, rank: int) -> None:
        pass


def gated(tiny_model_dir: Path, work: Path, error: Exception | None = None) -> Checkpointer:
    c = checkpointer(tiny_model_dir, work, 0, ASYNC)
    c.register("gate", Gate(error))
    return c


def test_save_returns_at_once_and_the_copy_is_what_is_published(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    c = gated(tiny_model_dir, tmp_path)
    train_one_step(c)
    at_save = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    path = c.save(TrainState(step=1))
    assert c.in_flight is not None and not path.exists()  # still being written
    train_one_step(c)  # training goes on, changing the weights in place
    assert any(not torch.equal(at_save[n], p) for n, p in c.model.named_parameters())
    c.states["gate"].opened.set()  # type: ignore[attr-defined]
    assert c.wait() == path == tmp_path / "step_1"
    assert ckpt.verify(path) is None and c.in_flight is None
    fresh = checkpointer(tiny_model_dir, tmp_path / "other", 1)
    load_model_weights(fresh.model, StepDir(path).weights)
    for name, value in fresh.model.named_parameters():
        assert torch.equal(value, at_save[name]), name  # the state at save, not after


def test_the_next_save_waits_for_the_one_in_flight(tiny_model_dir: Path, tmp_path: Path) -> None:
    c = gated(tiny_model_dir, tmp_path)
    c.save(TrainState(step=1))
    second = threading.Thread(target=c.save, args=(TrainState(step=2),))
    second.start()
    time.sleep(0.5)
    assert second.is_alive() and not (tmp_path / "step_1").exists()
    c.states["gate"].opened.set()  # type: ignore[attr-defined]
    second.join(60)
    assert c.wait() == tmp_path / "step_2"
    assert [s for s, _ in ckpt.step_dirs(tmp_path)] == [2, 1]


def test_the_last_save_is_finished_when_it_returns(tiny_model_dir: Path, tmp_path: Path) -> None:
    c = checkpointer(tiny_model_dir, tmp_path, 0, ASYNC)
    path = c.save(TrainState(step=4), last=True)
    assert c.in_flight is None and ckpt.verify(path) is None


def test_a_failed_async_save_is_raised_and_leaves_the_previous_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    c = gated(tiny_model_dir, tmp_path)
    c.states["gate"].opened.set()  # type: ignore[attr-defined]
    c.save(TrainState(step=1))
    c.wait()
    c.states["gate"].error = OSError("disk went away")  # type: ignore[attr-defined]
    c.save(TrainState(step=2))
    with pytest.raises(OSError, match="disk went away"):
        c.save(TrainState(step=3))  # the next save reports the failed one
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_1"


def test_is_async_is_no_longer_an_ignored_setting() -> None:
    assert ignored_settings(load_config(None, [ASYNC])) == []
