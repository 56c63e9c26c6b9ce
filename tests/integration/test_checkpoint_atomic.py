"""Atomic, verified checkpoints: SIGKILL mid-save, bit flips and truncation never break resume.

Killed runs are real processes: a fork of this test process runs the real entry point
(`sft_main`) and is killed with SIGKILL at a named point of the save of step 3
(`SFTKIT_TEST_SAVE_FAULT`), or at a random moment inside a slowed-down save; the same with
`checkpointing.is_async=true`, where the save is written by a background thread while the
next steps train. The restart must resume from the newest complete checkpoint and log
exactly what the uninterrupted reference logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from sftkit.checkpoint import layout as ckpt

STEPS = 5
EXACT = ("train/loss", "train/grad_norm", "train/lr")
ASYNC = "checkpointing.is_async=true"
SAVE_POINTS = [
    ("start", 2), ("files_written", 2), ("info_written", 2), ("manifest_tmp", 2),
    ("manifest_written", 2), ("renamed", 3), ("retention", 3),
]  # fmt: skip


def fork_run(small_run, work: Path, env: dict[str, str], *more: str) -> int:
    """Run the entry point in a forked child; returns its pid (the parent does not wait)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            os.environ.update(env)
            code = small_run.inprocess(work, f"sft.max_num_steps={STEPS}", *more).returncode
        finally:
            os._exit(code)
    return pid


def killed_by_sigkill(pid: int) -> bool:
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def assert_restart_is_exact(small_run, reference_run, work: Path) -> int:
    """Restart and compare; returns the step the restart resumed from (0: fresh)."""
    latest = ckpt.latest_checkpoint(work / "ckpt")
    start = 0 if latest is None else int(latest.name.split("_")[1])
    if latest is not None:
        assert ckpt.verify(latest) is None
    result = small_run.inprocess(work, f"sft.max_num_steps={STEPS}")
    assert result.returncode == 0
    rows, ref = result.train_rows(), reference_run.train_rows()
    assert sorted(rows) == list(range(start + 1, STEPS + 1))
    for step in rows:
        assert all(rows[step][k] == ref[step][k] for k in EXACT), step
    assert not list((work / "ckpt").glob("tmp_step_*"))  # debris of the killed save is gone
    return start


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("point", "resumes_from"), SAVE_POINTS)
def test_sigkill_at_each_save_point(
    small_run, reference_run, tmp_path: Path, point: str, resumes_from: int, mode: str
) -> None:
    keep = ["checkpointing.keep_top_k=1", "checkpointing.metric_name=null"]
    keep += [ASYNC] if mode == "async" else []
    pid = fork_run(small_run, tmp_path, {ckpt.FAULT_ENV: f"{point}@3"}, *keep)
    assert killed_by_sigkill(pid)
    assert assert_restart_is_exact(small_run, reference_run, tmp_path) == resumes_from


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moments_inside_a_save(
    small_run, reference_run, tmp_path: Path, seed: int, mode: str
) -> None:
    more = [ASYNC] if mode == "async" else []
    pid = fork_run(small_run, tmp_path, {ckpt.SLOW_ENV: "0.03"}, *more)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "ckpt").glob("tmp_step_*")) and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(random.Random(seed).uniform(0.0, 0.2))  # 7 points x 30 ms: anywhere in the save
    os.kill(pid, signal.SIGKILL)
    assert killed_by_sigkill(pid)
    assert_restart_is_exact(small_run, reference_run, tmp_path)


def test_async_saves_write_what_sync_saves_write(small_run, reference_run, tmp_path: Path) -> None:
    """Every step's state, copied when the save starts and written while the next steps
    train, hashes as the synchronous reference's does (weights, optimizer, sampler, RNG)."""
    result = small_run.inprocess(tmp_path, f"sft.max_num_steps={STEPS}", ASYNC)
    assert result.returncode == 0
    rows, ref = result.train_rows(), reference_run.train_rows()
    assert all(rows[step][k] == ref[step][k] for step in rows for k in EXACT)
    for step in range(1, STEPS + 1):
        path = tmp_path / "ckpt" / f"step_{step}"
        assert ckpt.verify(path) is None
        files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
        reference = reference_run.checkpoint_dir / f"step_{step}" / ckpt.MANIFEST
        expected = json.loads(reference.read_text())["files"]
        state = [n for n in files if n.endswith((".safetensors", ".pt"))]
        assert len(state) >= 5
        assert {n: files[n] for n in state} == {n: expected[n] for n in state}, step


def two_checkpoints(reference_run, work: Path) -> Path:
    for step in (5, 6):
        shutil.copytree(reference_run.checkpoint_dir / f"step_{step}", work / f"step_{step}")
    return work / "step_6"


def test_every_file_bit_flip_or_truncation_is_detected(
    reference_run, tmp_path: Path, caplog
) -> None:
    pristine = two_checkpoints(reference_run, tmp_path / "pristine")
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file())
    assert len(files) >= 9 and Path(ckpt.MANIFEST) in files
    for i, name in enumerate(files):
        for damage in ("flip", "truncate"):
            work = tmp_path / f"case_{i}_{damage}"
            shutil.copytree(pristine.parent, work)
            path = work / "step_6" / name
            data = bytearray(path.read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0x01
            else:
                data = data[: len(data) // 2]
            path.write_bytes(bytes(data))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="sftkit"):
                latest = ckpt.latest_checkpoint(work)
            assert latest == work / "step_5", (name, damage)
            assert "Skipping checkpoint" in caplog.text and "step_6" in caplog.text


def test_corrupted_latest_is_skipped_on_restart(small_run, reference_run, tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    latest = two_checkpoints(reference_run, ckpt_dir)
    weights = latest / "policy" / "weights" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x80
    weights.write_bytes(bytes(data))
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=7")
    assert result.returncode == 0
    ref = reference_run.train_rows()
    assert {s: r["train/loss"] for s, r in result.train_rows().items()} == {
        s: ref[s]["train/loss"] for s in (6, 7)
    }
    assert ckpt.verify(ckpt_dir / "step_6") is None  # re-saved, replacing the broken one


def test_partial_directories_are_not_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "step_9").mkdir()  # e.g. a half-deleted old checkpoint or a foreign copy
    (tmp_path / "tmp_step_10").mkdir()
    (tmp_path / "step_9" / ckpt.INFO).write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert "no manifest" in str(ckpt.verify(tmp_path / "step_9"))


def test_fault_hook_is_inert_when_unset(monkeypatch) -> None:
    monkeypatch.delenv(ckpt.FAULT_ENV, raising=False)
    monkeypatch.delenv(ckpt.SLOW_ENV, raising=False)
    for point in ckpt.FAULT_POINTS:
        ckpt.fault_point(point, 1)  # returns: nothing set
    monkeypatch.setenv(ckpt.FAULT_ENV, "renamed@7")
    ckpt.fault_point("renamed", 6)  # another step: no kill
    ckpt.fault_point("start", 7)  # another point: no kill
