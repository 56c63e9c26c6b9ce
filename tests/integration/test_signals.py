"""Preemption: SIGTERM / SIGUSR1 finish the step, save, exit 75; the next start resumes exactly."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from sftkit.checkpoint import layout as ckpt
from sftkit.errors import EXIT_REQUEUE

pytestmark = pytest.mark.slow  # real processes sent signals

EXACT = ("train/loss", "train/grad_norm", "train/lr", "train/global_valid_toks")


def assert_rows_match(got: dict, ref: dict) -> None:
    for step, row in got.items():
        for name in EXACT:
            assert row[name] == ref[step][name], (step, name)


def test_sigterm_saves_and_exits_for_requeue(
    preempted_run, reference_run, small_run, tmp_path: Path
) -> None:
    assert preempted_run.returncode == EXIT_REQUEUE, preempted_run.stderr[-2000:]
    stopped = max(preempted_run.train_rows())
    assert 2 <= stopped < 14
    assert "Stopping at step" in preempted_run.stderr and "SIGTERM" in preempted_run.stderr
    latest = ckpt.latest_checkpoint(preempted_run.checkpoint_dir)
    assert latest is not None and latest.name == f"step_{stopped}"
    assert not (preempted_run.checkpoint_dir / "final_hf").exists()
    # The real process computed exactly what the in-process reference did up to the stop...
    assert_rows_match(preempted_run.train_rows(), reference_run.train_rows())

    # ...and the next start resumes from the stop and finishes identically. It runs on a
    # copy: other tests read the preempted run as it stopped, in any order (xdist).
    work = tmp_path / "work"
    shutil.copytree(preempted_run.work, work, symlinks=True)
    resumed = small_run.inprocess(work)
    assert resumed.returncode == 0
    assert sorted(resumed.train_rows()) == list(range(stopped + 1, 15))
    assert_rows_match(resumed.train_rows(), reference_run.train_rows())
    assert (resumed.checkpoint_dir / "final_hf" / "model.safetensors").is_file()
    assert not (preempted_run.checkpoint_dir / "final_hf").exists()


def test_sigusr1_in_process(small_run, reference_run, tmp_path: Path) -> None:
    """Slurm's `--signal=USR1@...` warning: same behaviour as SIGTERM."""
    from tests.conftest import read_metrics

    def send_when_step_two_is_logged() -> None:
        exp = tmp_path / "logs" / "exp_001"
        while not any(r.get("step", 0) >= 2 for r in read_metrics(exp) if "train/loss" in r):
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=send_when_step_two_is_logged, daemon=True)
    sender.start()
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=600", "sft.max_num_epochs=100")
    sender.join(timeout=5)
    assert result.returncode == EXIT_REQUEUE
    stopped = max(result.train_rows())
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == f"step_{stopped}"
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler)


def test_deadline_saves_and_exits_for_requeue(small_run, tmp_path: Path) -> None:
    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=600", "sft.max_num_epochs=100", "checkpointing.save_period=0",
        "checkpointing.checkpoint_must_save_by=00:00:00:01",
    )  # fmt: skip
    assert result.returncode == EXIT_REQUEUE
    stopped = max(result.train_rows())
    assert stopped < 600
    assert [p.name for _, p in ckpt.step_dirs(tmp_path / "ckpt")] == [f"step_{stopped}"]


def wait_for_lock(proc, work: Path, timeout: float = 120) -> None:
    """The run's handlers are installed once rank 0 holds the lock on checkpoint_dir."""
    import time

    from sftkit.lifecycle.lock import LOCK_NAME

    end = time.monotonic() + timeout
    while not (work / "ckpt" / LOCK_NAME).exists():
        assert proc.poll() is None and time.monotonic() < end, (work / "stderr.txt").read_text()
        time.sleep(0.01)


@pytest.mark.parametrize("when", ["setup", "training"])
def test_sigterm_twice_is_one_stop(small_run, tmp_path: Path, when: str) -> None:
    """`timeout` and a process-group kill deliver SIGTERM twice. 30 ms apart in setup: a
    second Preempted, traceback, exit 1, no marker; 200 ms apart: exit 143 after "75"."""
    import time

    from sftkit.lifecycle.signals import MARKER_NAME
    from tests.conftest import wait_for_step

    proc = small_run.start(tmp_path, "sft.max_num_steps=600", "sft.max_num_epochs=100",
                           "checkpointing.save_period=0")  # fmt: skip
    if when == "setup":
        wait_for_lock(proc, tmp_path)
    else:
        wait_for_step(tmp_path / "logs", 2, proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.03 if when == "setup" else 0.2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=240)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == EXIT_REQUEUE, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (tmp_path / "ckpt" / MARKER_NAME).is_file()


def test_ctrl_c_under_self_launch_saves_and_stops(small_run, tmp_path: Path) -> None:
    """The terminal's Ctrl-C reaches the launcher and both ranks (the launcher then sends
    SIGTERM too): one stop, a checkpoint, 75, one line instead of a 32-line traceback."""
    import subprocess

    from sftkit.lifecycle.signals import MARKER_NAME
    from tests.conftest import wait_for_step

    tmp_path.mkdir(exist_ok=True)
    cmd = small_run.command(tmp_path, "cluster.gpus_per_node=2", "sft.max_num_steps=600",
                            "sft.max_num_epochs=100", "checkpointing.save_period=0")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=small_run.env(), start_new_session=True,
                            stdout=(tmp_path / "stdout.txt").open("w"),
                            stderr=(tmp_path / "stderr.txt").open("w"))  # fmt: skip
    try:
        wait_for_step(tmp_path / "logs", 2, proc, timeout=300)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole group
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == EXIT_REQUEUE, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr and "Ctrl-C: stopping after this step" in stderr
    assert (tmp_path / "ckpt" / MARKER_NAME).is_file()
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") is not None
