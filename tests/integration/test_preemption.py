"""Requeue under every launcher: exit 75 after a preemption save, a marker that job scripts
turn into 75 where torchrun hides the code, and a clean 75 for a signal during setup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sftkit.checkpoint import layout as ckpt
from sftkit.errors import EXIT_REQUEUE
from sftkit.lifecycle.signals import MARKER_NAME
from tests.conftest import REPO, wait_for_step


@pytest.mark.slow  # a training subprocess
def test_preemption_save_leaves_the_marker(preempted_run) -> None:
    assert preempted_run.returncode == EXIT_REQUEUE
    marker = preempted_run.checkpoint_dir / MARKER_NAME
    stopped = max(preempted_run.train_rows())
    assert json.loads(marker.read_text())["step"] == stopped


def test_signal_during_setup_exits_75_with_nothing_saved(
    small_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    import sftkit.train.recipe as recipe

    # Without sftkit's setup handler this records the signal instead of killing pytest.
    seen: list[int] = []

    def recorder(signum: int, frame: object) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, recorder)
    real_build_model = recipe.build_model

    def preempted_while_loading(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build_model(*args, **kwargs)

    monkeypatch.setattr(recipe, "build_model", preempted_while_loading)
    try:
        capsys.readouterr()
        result = small_run.inprocess(tmp_path, "sft.max_num_steps=2")
        handler_after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.returncode == EXIT_REQUEUE
    assert "during setup" in capsys.readouterr().err
    assert seen == [] and handler_after is recorder  # sftkit's handler took it, then left
    assert not ckpt.step_dirs(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / MARKER_NAME).is_file()
    assert not (tmp_path / "ckpt" / ".sftkit.lock").exists()
    # The next start is an ordinary run that clears the marker.
    monkeypatch.undo()
    assert small_run.inprocess(tmp_path, "sft.max_num_steps=1").returncode == 0
    assert not (tmp_path / "ckpt" / MARKER_NAME).exists()


def sbatch(tmp_path: Path, srun_body: str, **env: str) -> subprocess.CompletedProcess:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'gpu07\\n'\n")
    (stubs / "srun").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun_args\n{srun_body}\n"
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    full = {
        **os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu07",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "99", "SLURM_SUBMIT_DIR": str(tmp_path),
        **env,
    }  # fmt: skip
    for name in ("SFTKIT_PREEMPTED_MARKER", "GPUS_PER_NODE", "SLURM_GPUS_PER_NODE"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(["bash", str(REPO / "examples" / "slurm" / "sft.sbatch"), "a.b=1"],
                          env=full, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip


@pytest.mark.slow  # runs the sbatch script
def test_sbatch_turns_the_marker_into_75(tmp_path: Path) -> None:
    # torchrun's ranks saved and exited 75, torchrun returned 1; rank 0 left the marker.
    result = sbatch(tmp_path, 'touch "$SFTKIT_PREEMPTED_MARKER"; exit 1')
    assert result.returncode == EXIT_REQUEUE, result.stderr
    assert not list(tmp_path.glob(".sftkit-preempted-*"))  # consumed
    assert sbatch(tmp_path, "exit 1").returncode == 1  # a real failure stays a failure
    assert sbatch(tmp_path, "exit 0").returncode == 0


@pytest.mark.slow  # runs the sbatch script
def test_sbatch_gpus_follow_the_allocation(tmp_path: Path) -> None:
    result = sbatch(tmp_path, "exit 0", SLURM_GPUS_PER_NODE="h100:4")
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert result.returncode == 0 and "--nproc-per-node=4" in args and "--gpus-per-node=4" in args
    mismatch = sbatch(tmp_path, "exit 0", SLURM_GPUS_PER_NODE="8", GPUS_PER_NODE="4")
    assert mismatch.returncode == 2 and "--gpus-per-node=4" in mismatch.stderr
    script = (REPO / "examples" / "slurm" / "sft.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in script


def terminate_after_step(proc: subprocess.Popen, logs: Path, step: int = 2) -> int:
    wait_for_step(logs, step, proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=240)


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_self_launch_returns_75_when_the_launcher_is_signalled(small_run, tmp_path: Path) -> None:
    """SIGTERM to the launcher only (not the ranks): torch's agent stops the ranks, they save,
    and the launcher returns 75 instead of a traceback."""
    proc = small_run.start(tmp_path, "cluster.gpus_per_node=2", "sft.max_num_steps=600",
                           "sft.max_num_epochs=100", "checkpointing.save_period=0")  # fmt: skip
    code = terminate_after_step(proc, tmp_path / "logs")
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == EXIT_REQUEUE, stderr[-3000:]
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") is not None


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_torchrun_leaves_the_marker(small_run, tmp_path: Path) -> None:
    """Under torchrun the ranks' 75 is lost (torchrun returns 1); the marker is not."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *small_run.command(tmp_path, "sft.max_num_steps=600", "sft.max_num_epochs=100",
                              "checkpointing.save_period=0")[1:]]  # fmt: skip
    tmp_path.mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=small_run.env(),
                            stdout=(tmp_path / "stdout.txt").open("w"),
                            stderr=(tmp_path / "stderr.txt").open("w"))  # fmt: skip
    code = terminate_after_step(proc, tmp_path / "logs")
    marker = tmp_path / "ckpt" / MARKER_NAME
    assert marker.is_file(), (code, (tmp_path / "stderr.txt").read_text()[-3000:])
    latest = ckpt.latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None and latest.name == f"step_{json.loads(marker.read_text())['step']}"


@pytest.mark.slow  # a training subprocess
def test_preemption_with_an_async_save_in_flight_publishes_both(small_run, tmp_path: Path) -> None:
    """`checkpointing.is_async` with slow saves (one in flight when SIGTERM comes): the
    stopping save waits for it, then saves the stopped step and finishes it before exit 75."""
    proc = small_run.start(tmp_path, "checkpointing.is_async=true", "sft.max_num_steps=600",
                           "sft.max_num_epochs=100", env={ckpt.SLOW_ENV: "0.1"})  # fmt: skip
    code = terminate_after_step(proc, tmp_path / "logs")
    assert code == EXIT_REQUEUE, (tmp_path / "stderr.txt").read_text()[-3000:]
    stopped = max(
        json.loads(line).get("step", 0)
        for path in (tmp_path / "logs").rglob("metrics.jsonl")
        for line in path.read_text().splitlines()
    )
    latest = ckpt.latest_checkpoint(tmp_path / "ckpt")
    assert latest == tmp_path / "ckpt" / f"step_{stopped}"
    assert ckpt.verify(latest) is None and ckpt.verify(latest.with_name("step_1")) is None
    assert not list((tmp_path / "ckpt").glob("tmp_step_*"))
