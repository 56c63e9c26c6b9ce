"""Retention rules, deadline parsing, ranking metrics and the manifest, on small fake dirs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from sftkit.checkpoint import layout as ckpt


def fake_checkpoint(root: Path, step: int, info: dict) -> Path:
    return ckpt.save_checkpoint(root, step, info, lambda d: (d / "w.bin").write_bytes(b"x" * step))


def test_top_k_lower_is_better_ties_go_to_the_newer() -> None:
    entries = [(1, 0.5), (2, 0.3), (3, 0.3), (4, 0.9)]
    # best two: 3 (0.3, newer wins the tie), then 2 (0.3); 4 is kept as the latest
    assert ckpt.checkpoints_to_delete(entries, 2, higher_is_better=False) == [1]
    assert ckpt.checkpoints_to_delete(entries, 1, higher_is_better=False) == [1, 2]


def test_top_k_higher_is_better_and_latest_always_kept() -> None:
    entries = [(1, 0.5), (2, 0.3), (3, 0.9), (4, 0.1)]
    assert ckpt.checkpoints_to_delete(entries, 1, higher_is_better=True) == [1, 2]


def test_missing_metric_ranks_last_and_keep_latest_k() -> None:
    entries = [(1, 0.1), (2, None), (3, None), (4, None)]
    assert ckpt.checkpoints_to_delete(entries, 1, False) == [2, 3]
    assert ckpt.checkpoints_to_delete(entries, 1, False, keep_latest_k=2) == [2]
    assert ckpt.checkpoints_to_delete(entries, None, False) == []


def test_apply_retention_reads_metric_from_training_info(tmp_path: Path, caplog) -> None:
    for step, loss in [(2, 0.7), (4, 0.2), (6, 0.5), (8, 0.9)]:
        fake_checkpoint(tmp_path, step, {"step": step, "train:loss": loss})
    deleted = ckpt.apply_retention(tmp_path, "train:loss", 2, False)
    assert sorted(p.name for p in deleted) == ["step_2"]
    assert [p.name for _, p in ckpt.step_dirs(tmp_path)] == ["step_8", "step_6", "step_4"]
    fake_checkpoint(tmp_path, 10, {"step": 10})
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        ckpt.apply_retention(tmp_path, "train:loss", 2, False)
    assert "not measured at step 10" in caplog.text
    assert [p.name for _, p in ckpt.step_dirs(tmp_path)] == ["step_10", "step_6", "step_4"]


def test_failed_delete_warns_and_does_not_raise(tmp_path: Path, monkeypatch, caplog) -> None:
    for step in (1, 2):
        fake_checkpoint(tmp_path, step, {"step": step})

    def refuse(path: object, *a: object, **k: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(ckpt.shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        assert ckpt.apply_retention(tmp_path, None, 1, False) == []
    assert "Could not delete" in caplog.text


def test_save_is_atomic_and_cleans_debris(tmp_path: Path) -> None:
    (tmp_path / "tmp_step_3").mkdir(parents=True)  # left by a killed save
    path = fake_checkpoint(tmp_path, 5, {"step": 5})
    assert path.name == "step_5" and ckpt.verify(path) is None
    assert not list(tmp_path.glob("tmp_step_*"))
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"w.bin", ckpt.INFO}


def test_save_replaces_a_broken_same_step_dir(tmp_path: Path) -> None:
    (tmp_path / "step_4").mkdir(parents=True)
    path = fake_checkpoint(tmp_path, 4, {"step": 4})
    assert ckpt.verify(path) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, None), ("00:00:00:05", 5), ("01:02:03:04", 93784), ("00:03:30:00", 12600)],
)
def test_parse_deadline(text: str | None, seconds: int | None) -> None:
    assert ckpt.parse_deadline(text) == seconds


def test_ranking_metric_is_generic() -> None:
    logged = {"train/loss": 1.5, "train/grad_norm": 3.0, "validation/val_loss": 2.0}
    assert ckpt.ranking_metric("train:loss", logged) == {"train:loss": 1.5}
    assert ckpt.ranking_metric("train:grad_norm", logged) == {"train:grad_norm": 3.0}
    assert ckpt.ranking_metric("val:val_loss", logged) == {"val:val_loss": 2.0}
    assert ckpt.ranking_metric("val:accuracy", logged) == {}
    assert ckpt.ranking_metric(None, logged) == {}


def test_fingerprint_differences_name_each_key() -> None:
    diffs = ckpt.fingerprint_differences({"model": "a", "gbs": 16}, {"model": "b", "gbs": 16})
    assert diffs == ["model: checkpoint has 'a', this run has 'b'"]


def test_archive_moves_old_checkpoints(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 1, {"step": 1})
    archive = ckpt.archive_old_checkpoints(tmp_path)
    assert archive is not None and (archive / "step_1").is_dir()
    assert ckpt.step_dirs(tmp_path) == []
    shutil.rmtree(archive)
