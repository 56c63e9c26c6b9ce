"""Resume refuses what it cannot honour (a changed optimizer, scheduler or LoRA base), old
checkpoints still resume with one warning, and `resume_mismatch=stage` continues on new data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.checkpointer import base_weights_digest, resume_fingerprint
from sftkit.config import load_config
from tests.unit.checkpoint.test_checkpoint_resume_fingerprint import (
    DATA,
    QUICKSTART,
    write_checkpoint,
)


def fingerprint(*overrides: str) -> dict[str, Any]:
    fp = resume_fingerprint(load_config(QUICKSTART, ["cluster.device=cpu", *overrides]), None, DATA)
    fp.pop(ckpt.LEGACY_FINGERPRINT)  # never stored
    return json.loads(json.dumps(fp))  # as training_info.json stores it


@pytest.mark.parametrize(
    ("override", "named"),
    [("policy.optimizer.kwargs.lr=1e-3", "optimizer: checkpoint has"),
     ("policy.optimizer.name=torch.optim.SGD", "optimizer: checkpoint has"),
     ("policy.scheduler=null", "scheduler: checkpoint has")],
    ids=["lr", "optimizer-class", "scheduler"],
)  # fmt: skip
def test_changed_optimizer_or_scheduler_is_refused(
    tmp_path: Path, override: str, named: str
) -> None:
    """The checkpoint's optimizer and scheduler state win on resume: a new lr was ignored
    while config.yaml recorded it, another class ended in a KeyError traceback."""
    step = write_checkpoint(tmp_path, fingerprint())
    assert ckpt.check_resumable(step, fingerprint()) is False
    with pytest.raises(ckpt.ResumeMismatchError, match=named):
        ckpt.check_resumable(step, fingerprint(override))


def test_a_checkpoint_without_the_new_keys_resumes_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = {k: v for k, v in fingerprint().items() if k not in ckpt.ADDED_KEYS}
    step = write_checkpoint(tmp_path, old)
    with caplog.at_level("WARNING", logger="sftkit"):
        ckpt.check_resumable(step, fingerprint("policy.optimizer.kwargs.lr=1e-3"))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "optimizer, scheduler, base_weights" in warnings[0].message


def test_a_lora_base_changed_under_the_same_name_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    weights = {"w": torch.zeros(4096), "v": torch.ones(8)}
    save_file(weights, base / "model.safetensors")
    before = base_weights_digest(base)
    assert before is not None and base_weights_digest(base) == before
    save_file({**weights, "w": torch.full((4096,), 1e-3)}, base / "model.safetensors")
    after = base_weights_digest(base)
    assert after != before  # same names, dtypes and shapes: the data differs
    lora = ["policy.dtensor_cfg.lora_cfg.enabled=true", f"policy.model_name={base}"]
    saved = {**fingerprint(*lora), "base_weights": before}
    assert fingerprint(*lora)["base_weights"] == after
    step = write_checkpoint(tmp_path / "ckpt", saved)
    with pytest.raises(ckpt.ResumeMismatchError, match="base_weights: checkpoint has"):
        ckpt.check_resumable(step, fingerprint(*lora))
    assert fingerprint(f"policy.model_name={base}")["base_weights"] is None  # full FT: unused
    from sftkit.checkpoint.export import _check_base

    with pytest.raises(ValueError, match="LoRA trained on other base weights"):
        _check_base(step, str(base))  # `sftkit export` merges onto the base: refused too
    save_file(weights, base / "model.safetensors")
    _check_base(step, str(base))  # the base it was trained on


def test_stage_continues_on_new_data_only(tmp_path: Path) -> None:
    saved = fingerprint()
    step = write_checkpoint(tmp_path, saved)
    new_data = {**fingerprint(), "train_data": "another-digest", "shuffle": False}
    with pytest.raises(ckpt.ResumeMismatchError, match="resume_mismatch=stage"):
        ckpt.check_resumable(step, new_data)
    assert ckpt.check_resumable(step, new_data, stage=True) is True
    assert ckpt.check_resumable(step, fingerprint(), stage=True) is False  # same data: resume
    with pytest.raises(ckpt.ResumeMismatchError, match="seed: checkpoint has") as refused:
        ckpt.check_resumable(step, {**new_data, "seed": 7}, stage=True)
    assert "resume_mismatch=stage" not in str(refused.value)  # not a data-only change
