"""What reaches the disk: never non-finite weights, never half a model, and write problems
found before the work (unusable directories) or reported in one line (a full disk)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.state import check_finite_weights


def steps(checkpoint_dir: Path) -> list[str]:
    return [p.name for _, p in ckpt.step_dirs(checkpoint_dir)]


def one_paragraph(err: str, start: str) -> str:
    assert start in err, err[-3000:]
    message = err[err.index(start) :].strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in err, message
    return message


def test_nonfinite_weights_never_reach_a_checkpoint(small_run, tmp_path: Path, capsys) -> None:
    """weight_decay overflow: step 3's loss is finite, its update makes the weights inf.

    Without optimizer state in the checkpoint the resumed run takes the new lr (a saved
    optimizer would restore the old one)."""
    fresh_optimizer = "checkpointing.save_optimizer=false"
    assert small_run.inprocess(tmp_path, "sft.max_num_steps=2", fresh_optimizer).returncode == 0
    before = ckpt.verify(tmp_path / "ckpt" / "step_2")
    assert before is None
    capsys.readouterr()
    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=4", "policy.optimizer.kwargs.lr=1e30",
        "policy.optimizer.kwargs.weight_decay=1e12", fresh_optimizer,
    )  # fmt: skip
    message = one_paragraph(capsys.readouterr().err, "Training stopped")
    assert result.returncode == 1
    assert "non-finite weights after step 3" in message
    assert steps(tmp_path / "ckpt") == ["step_2", "step_1"]
    assert not list((tmp_path / "ckpt").glob("tmp_step_*"))
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "step_2"


def test_finite_weights_pass_and_every_rank_agrees() -> None:
    params = [torch.ones(3), torch.zeros(0), torch.full((2, 2), 1e30)]
    check_finite_weights(params, 1)
    with pytest.raises(Exception, match=r"after step 5 \(1 parameter tensors"):
        check_finite_weights([*params, torch.tensor([1.0, float("nan")])], 5)
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(Exception, match="non-finite weights"):
            check_finite_weights([torch.tensor([0.0, bad], dtype=torch.bfloat16)], 1)
    with pytest.raises(Exception, match="2 parameter tensors"):  # another rank found two
        check_finite_weights(params, 1, lambda local: local + 2)


@pytest.mark.parametrize(
    ("lr", "code", "says"),
    [("1e45", 2, "policy.optimizer.kwargs.lr"), ("inf", 2, "policy.optimizer.kwargs.lr"),
     ("1e38", 1, "Training stopped")],  # fits float32: the update overflows, one line
)  # fmt: skip
def test_overflowing_learning_rate_is_one_line(
    small_run, tmp_path: Path, capsys, lr: str, code: int, says: str
) -> None:
    capsys.readouterr()
    result = small_run.inprocess(
        tmp_path, f"policy.optimizer.kwargs.lr={lr}", "sft.max_num_steps=2"
    )
    err = capsys.readouterr().err
    assert result.returncode == code, err[-3000:]
    one_paragraph(err, says)
    if code == 2:  # a config error: nothing ran
        assert not list((tmp_path / "ckpt").glob("step_*"))


@pytest.fixture
def no_model_load(monkeypatch):
    import sftkit.train.recipe as recipe

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the directory error was reported")

    monkeypatch.setattr(recipe, "build_model", forbidden)


@pytest.mark.parametrize("key", ["checkpointing.checkpoint_dir", "logger.log_dir"])
def test_unusable_output_directory_fails_before_the_model_loads(
    small_run, tmp_path: Path, capsys, no_model_load, key: str
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, f"{key}={blocker / 'sub'}")
    message = one_paragraph(capsys.readouterr().err, "Error")
    assert result.returncode == 2
    assert f"{key}={blocker / 'sub'}" in message and "not a writable directory" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_checkpoint_dir_fails_early(small_run, tmp_path: Path, no_model_load) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = small_run.inprocess(tmp_path, f"checkpointing.checkpoint_dir={locked / 'ckpt'}")
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous(
    small_run, tmp_path: Path, capsys, monkeypatch
) -> None:
    assert small_run.inprocess(tmp_path, "sft.max_num_steps=1").returncode == 0
    original = torch.save

    def disk_full_in_step_2(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if "tmp_step_2" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_in_step_2)
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=3")
    message = one_paragraph(capsys.readouterr().err, "Training stopped")
    assert result.returncode == 1
    assert "no space left" in message and "step 2" in message and "GB" in message
    assert "tmp_step_2" in message
    assert not list((tmp_path / "ckpt").glob("tmp_step_*"))
    assert steps(tmp_path / "ckpt") == ["step_1"]
    assert ckpt.verify(tmp_path / "ckpt" / "step_1") is None
    monkeypatch.undo()
    resumed = small_run.inprocess(tmp_path, "sft.max_num_steps=3")
    assert resumed.returncode == 0 and sorted(resumed.train_rows()) == [2, 3]


def test_a_failed_final_export_leaves_no_half_model(small_run, tmp_path: Path, monkeypatch) -> None:
    import sftkit.checkpoint.checkpointer as checkpointer

    def dies_halfway(model: object, tokenizer: object, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # what a kill mid-write leaves behind, minus the process

    monkeypatch.setattr(checkpointer, "save_hf", dies_halfway)
    assert small_run.inprocess(tmp_path, "sft.max_num_steps=1").returncode == 130  # aborted
    assert not (tmp_path / "ckpt" / "final_hf").exists()
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if "final" in p.name] == []


def test_export_replaces_its_output_whole(reference_run, tmp_path: Path, monkeypatch) -> None:
    import sftkit.model.load as load
    from sftkit.checkpoint.export import export_checkpoint

    step = reference_run.checkpoint_dir / "step_3"
    out = export_checkpoint(step, tmp_path / "hf")
    good = (out / "model.safetensors").read_bytes()
    real_save = load.save_hf

    def dies_halfway(model: object, tokenizer: object, directory: Path) -> None:
        real_save(model, tokenizer, directory)
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(load, "save_hf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(step, out)
    assert (out / "model.safetensors").read_bytes() == good  # the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier sftkit export"):
        export_checkpoint(step, tmp_path / "other")


def test_export_never_deletes_what_it_did_not_write(reference_run, tmp_path: Path) -> None:
    """A directory holding a config.json was taken for an earlier export and replaced whole:
    the user's notes.txt and src/ were deleted, exit 0."""
    import shutil

    from sftkit.checkpoint.export import EXPORT_MARKER, export_checkpoint

    step = reference_run.checkpoint_dir / "step_3"
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds config.json, notes.txt, src\)"):
        export_checkpoint(step, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "src").is_dir()
    out = export_checkpoint(step, tmp_path / "hf")
    assert (out / EXPORT_MARKER).is_file()
    export_checkpoint(step, out)  # its own export: replaced

    # retention of the run that wrote it deletes the step meanwhile: said so
    copy = tmp_path / "ckpt" / "step_3"
    shutil.copytree(step, copy)
    from sftkit.checkpoint.weights import ModelPart

    real = ModelPart.load

    def retention_strikes(self: ModelPart, *args: object, **kwargs: object) -> None:
        shutil.rmtree(copy)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    ModelPart.load = retention_strikes  # type: ignore[method-assign]
    try:
        with pytest.raises(ValueError, match="was deleted while it was being exported"):
            export_checkpoint(copy, tmp_path / "hf2")
    finally:
        ModelPart.load = real  # type: ignore[method-assign]


def test_export_says_what_it_did_and_follows_the_umask(
    reference_run, tmp_path: Path, capsys
) -> None:
    import os

    from sftkit.cli import export_main

    ckpt_dir = reference_run.checkpoint_dir
    capsys.readouterr()
    # the README's example on a path that is not there (keep_top_k may have deleted it)
    assert export_main([str(ckpt_dir / "step_250"), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt_dir / 'step_250'} does not exist; {ckpt_dir} holds step_14, step_13" in err
    previous = os.umask(0o027)
    try:
        assert export_main([str(ckpt_dir), str(tmp_path / "hf")]) == 0  # the latest step
    finally:
        os.umask(previous)
    out = capsys.readouterr().out
    assert (
        out.strip()
        == f"exported step_14 ({ckpt_dir / 'step_14'}) as an HF model to {tmp_path / 'hf'}"
    )
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o640 and modes["config.json"] == 0o640, modes
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o750
