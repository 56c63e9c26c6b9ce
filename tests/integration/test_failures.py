"""Loud failures: non-finite loss stops before the update; impossible configs fail before the model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sftkit.checkpoint import layout as ckpt
from tests.conftest import QUICKSTART, one_example_data


def tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_exploding_lr_stops_loudly_and_keeps_the_checkpoint(small_run, tmp_path: Path) -> None:
    """lr=1e30: step 1 is finite (and saved), its update makes step 2's loss non-finite."""
    result = small_run.subprocess(
        tmp_path, "policy.optimizer.kwargs.lr=1e30", "sft.max_num_steps=4",
        "checkpointing.save_period=1",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    err = result.stderr
    assert "Training stopped: non-finite" in err and "at step 2 on rank 0" in err
    assert "Traceback" not in err
    message = err[err.index("Training stopped") :]
    assert len(message.strip().splitlines()) == 1  # one paragraph, with the fix
    assert sorted(result.train_rows()) == [1]
    assert [p.name for _, p in ckpt.step_dirs(result.checkpoint_dir)] == ["step_1"]
    assert ckpt.verify(result.checkpoint_dir / "step_1") is None
    assert not list(result.checkpoint_dir.glob("tmp_step_*"))
    assert not (result.checkpoint_dir / "final_hf").exists()


def test_nonfinite_leaves_last_checkpoint_untouched_in_process(
    small_run, tmp_path: Path, capsys
) -> None:
    first = small_run.inprocess(tmp_path, "sft.max_num_steps=1", "policy.optimizer.kwargs.lr=1e30")
    assert first.returncode == 0
    before = tree_hash(tmp_path / "ckpt" / "step_1")
    capsys.readouterr()
    second = small_run.inprocess(tmp_path, "sft.max_num_steps=3", "policy.optimizer.kwargs.lr=1e30")
    assert second.returncode == 1
    assert "non-finite" in capsys.readouterr().err
    assert tree_hash(tmp_path / "ckpt" / "step_1") == before
    assert [p.name for _, p in ckpt.step_dirs(tmp_path / "ckpt")] == ["step_1"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load the model."""
    import sftkit.train.recipe as recipe

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the config error was reported")

    monkeypatch.setattr(recipe, "build_model", forbidden)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["policy.train_micro_batch_size=6"], "multiple of policy.train_micro_batch_size"),
        (["data.validation=null", "sft.val_period=5"], "no validation data"),
        (["checkpointing.checkpoint_must_save_by=1:00"], "DD:HH:MM:SS"),
        (["checkpointing.metric_name=loss"], "must start with 'val:'"),
    ],
)
def test_impossible_configs_fail_before_the_model_loads(
    small_run, tmp_path: Path, capsys, no_model_load, overrides: list[str], says: str
) -> None:
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, *overrides)
    err = capsys.readouterr().err
    assert result.returncode == 2
    assert says in err and "Traceback" not in err


def test_global_batch_must_divide_over_data_parallel_ranks(small_run, tmp_path: Path) -> None:
    from sftkit.config import load_config
    from sftkit.dist import DistEnv
    from sftkit.train.recipe import check_before_model

    cfg = load_config(QUICKSTART, small_run.overrides(tmp_path))
    data = one_example_data()
    check_before_model(cfg, DistEnv(world_size=2), data)  # 16 = 8 x 2: fine
    with pytest.raises(ValueError, match="data-parallel size = 8 x 4"):
        check_before_model(cfg, DistEnv(world_size=4), data)


def test_unreachable_mlflow_server_is_a_clear_error(small_run, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    result = small_run.inprocess(
        tmp_path, "logger.mlflow_enabled=true", "logger.mlflow.tracking_uri=http://127.0.0.1:9"
    )
    err = capsys.readouterr().err
    assert result.returncode == 1
    assert "unreachable" in err and "tracking_uri" in err and "Traceback" not in err
    assert not list((tmp_path / "ckpt").glob("step_*"))  # failed at start, before training
