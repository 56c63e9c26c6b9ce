"""One run per checkpoint directory: a second live run is refused at start (exit 2, naming
the holder); dead, silent or same-Slurm-job holders are taken over; a switch forces it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from sftkit.lifecycle import lock as run_lock
from sftkit.lifecycle.lock import LOCK_NAME, Holder, LockHeldError, RunLock
from tests.conftest import wait_for_step


def write_lock(directory: Path, **fields: object) -> Path:
    holder = {**asdict(Holder.me()), "token": "someone-else", "slurm_job_id": None, **fields}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(json.dumps(holder))
    return directory / LOCK_NAME


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_by_name(tmp_path: Path, live_pid: int) -> None:
    write_lock(tmp_path, pid=live_pid, slurm_job_id="111")
    with pytest.raises(
        LockHeldError, match=f"pid {live_pid} on {socket.gethostname()}, Slurm job 111"
    ):
        RunLock(tmp_path).acquire()
    other_host = tmp_path / "b"
    write_lock(other_host, host="node-elsewhere", pid=1)
    with pytest.raises(LockHeldError, match="take_over_lock=true"):
        RunLock(other_host).acquire()


@pytest.mark.parametrize(
    "fields",
    [{"pid": 2**22 + 12345}, {"host": "node-elsewhere", "heartbeat": time.time() - 3600},
     {"host": "node-elsewhere", "slurm_job_id": "777", "slurm_restart": "0"},
     {"host": "x", "pid": "garbage"}],
    ids=["dead-pid", "silent", "earlier-incarnation-of-this-slurm-job", "unreadable"],
)  # fmt: skip
def test_stale_locks_are_taken_over(tmp_path: Path, monkeypatch, fields: dict) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued once: Slurm ended the old steps
    path = write_lock(tmp_path, **fields)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.me.token
    lock.release()
    assert not path.exists()


def test_same_slurm_job_alone_is_no_evidence(tmp_path: Path, monkeypatch, live_pid: int) -> None:
    """A second run inside the same allocation took over a live run's lock (same job id)."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    write_lock(tmp_path, pid=live_pid, slurm_job_id="777", slurm_restart="0")
    with pytest.raises(LockHeldError, match=f"pid {live_pid}"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path / "b", host="node-elsewhere", slurm_job_id="777", slurm_restart="0")
    with pytest.raises(LockHeldError, match="Slurm job 777"):  # same job, another node: alive
        RunLock(tmp_path / "b").acquire()


def test_a_run_whose_lock_was_taken_over_stops_without_saving(
    small_run, tmp_path: Path, capsys, monkeypatch, live_pid: int
) -> None:
    """The holder was paused past STALE_AFTER_S (SIGSTOP, a hung filesystem) and another run
    took over: it used to log an ERROR and keep saving over the other run's step_N."""
    import sftkit.train.loop as loop

    real = loop.ensure_held

    def taken_over_after_step_2(lock, env) -> None:
        if loop.ensure_held.calls == 2:  # type: ignore[attr-defined]
            write_lock(tmp_path / "ckpt", pid=live_pid)  # the other run's lock
        loop.ensure_held.calls += 1  # type: ignore[attr-defined]
        real(lock, env)

    taken_over_after_step_2.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(loop, "ensure_held", taken_over_after_step_2)
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=5")
    err = capsys.readouterr().err
    assert result.returncode == 1
    assert f"another run took over {tmp_path / 'ckpt'} by pid {live_pid}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_1", "step_2"]
    assert not (tmp_path / "ckpt" / "final_hf").exists()
    assert json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())["pid"] == live_pid  # kept


def test_take_over_switch_and_release_keeps_foreign_locks(tmp_path: Path, live_pid: int) -> None:
    path = write_lock(tmp_path, pid=live_pid)
    lock = RunLock(tmp_path, take_over=True)
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == lock.me.pid
    write_lock(tmp_path, pid=live_pid)  # another run took it from us meanwhile
    lock.release()
    assert json.loads(path.read_text())["pid"] == live_pid  # not ours: left alone


def test_heartbeat_is_refreshed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    lock.release()


def test_second_run_is_refused_before_the_model_loads(
    small_run, tmp_path: Path, capsys, monkeypatch, live_pid: int
) -> None:
    import sftkit.train.recipe as recipe

    write_lock(tmp_path / "ckpt", pid=live_pid)
    (tmp_path / "ckpt" / "tmp_step_7").mkdir()  # the holder's save in progress
    monkeypatch.setattr(recipe, "build_model", lambda *a, **k: pytest.fail("model loaded"))
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=1")
    err = capsys.readouterr().err
    assert result.returncode == 2
    assert f"in use by another run (pid {live_pid}" in err and "Traceback" not in err
    assert (tmp_path / "ckpt" / "tmp_step_7").is_dir()
    assert json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())["pid"] == live_pid
    monkeypatch.undo()
    forced = small_run.inprocess(
        tmp_path, "sft.max_num_steps=1", "checkpointing.take_over_lock=true"
    )
    assert forced.returncode == 0
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()  # released at the end


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_two_real_runs_into_one_directory(small_run, tmp_path: Path) -> None:
    """A live run (a real process) keeps a second one out, and its saves keep going."""
    first = small_run.start(tmp_path / "a", f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
                            "sft.max_num_steps=600", "sft.max_num_epochs=100")  # fmt: skip
    try:
        wait_for_step(tmp_path / "a" / "logs", 1, first)
        second = small_run.subprocess(
            tmp_path / "b", f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}", timeout=120
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # untouched, still training
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
