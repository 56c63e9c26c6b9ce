"""A checkpoint directory is untrusted input: no pickle in it runs, malformed manifests are
skipped like corrupt ones, and nothing named in it leads out of checkpoint_dir."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.safe_load import UnsafeCheckpointError, dcp_load, load_metadata


class Exploit:
    """Unpickling this runs `Path.touch(marker)`: what a poisoned checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


class SystemCall:
    """The classic: `os.system(...)` at unpickling time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def poisoned_dcp_step(reference_run, work: Path, payload: object) -> Path:
    """A copy of the reference's step_3 with `policy/dcp/.metadata` = `payload`, re-manifested
    (an attacker who can write the directory can rewrite the manifest too)."""
    step = work / "ckpt" / "step_3"
    shutil.copytree(reference_run.checkpoint_dir / "step_3", step)
    dcp_dir = step / "policy" / "dcp"
    dcp_dir.mkdir(parents=True)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(payload))
    ckpt.write_manifest(step)
    return step


@pytest.mark.parametrize("kind", [Exploit, SystemCall])
def test_poisoned_dcp_metadata_is_refused_on_resume(
    reference_run, small_run, tmp_path: Path, capsys, kind: type
) -> None:
    marker = tmp_path / "pwned"
    poisoned_dcp_step(reference_run, tmp_path, {"x": kind(marker)})
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=4")
    err = capsys.readouterr().err
    assert not marker.exists()
    assert result.returncode == 2
    assert ".metadata" in err and "refusing" in err and "Traceback" not in err


def test_poisoned_dcp_metadata_is_refused_by_export(reference_run, tmp_path: Path, capsys) -> None:
    from sftkit.cli import export_main as main

    marker = tmp_path / "pwned"
    step = poisoned_dcp_step(reference_run, tmp_path, Exploit(marker))
    capsys.readouterr()
    code = main([str(step), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 2 and ".metadata" in err and "refusing" in err
    assert not (tmp_path / "out").exists()


def test_real_dcp_checkpoints_still_load(tmp_path: Path) -> None:
    """The allow-list covers what DCP writes: tensors, optimizer state and its plain values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_opt.step()
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_load(state, tmp_path)
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    assert state["optim"]["param_groups"][0]["lr"] == 0.01
    assert tuple(state["optim"]["param_groups"][0]["betas"]) == (0.8, 0.9)


def test_metadata_pointing_outside_its_directory_is_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path))
    metadata = load_metadata(tmp_path / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="elsewhere"):
        load_metadata(tmp_path / ".metadata")


@pytest.mark.parametrize(
    "name",
    ["train_dataloader.pt", "rng/rank_0.pt", "policy/optimizer/optimizer.pt",
     "policy/optimizer/scheduler.pt"],
)  # fmt: skip
def test_poisoned_state_file_is_one_line_naming_it(
    reference_run, small_run, tmp_path: Path, capsys, name: str
) -> None:
    step = tmp_path / "ckpt" / "step_3"
    shutil.copytree(reference_run.checkpoint_dir / "step_3", step)
    marker = tmp_path / "pwned"
    torch.save({"state": SystemCall(marker)}, step / name)
    ckpt.write_manifest(step)
    capsys.readouterr()
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=4")
    err = capsys.readouterr().err
    assert not marker.exists()
    assert result.returncode == 2 and "Traceback" not in err
    assert name.split("/")[-1] in err and "refusing" in err


def two_checkpoints(reference_run, work: Path) -> Path:
    for step in (5, 6):
        shutil.copytree(reference_run.checkpoint_dir / f"step_{step}", work / f"step_{step}")
    return work / "step_6"


MALFORMED = {
    "list": [],
    "no files": {"format_version": 1},
    "files is a list": {"format_version": 1, "files": ["config.yaml"]},
    "entry not a mapping": {"files": {"config.yaml": 1}},
    "size is text": {"files": {"config.yaml": {"size": "12", "sha256": "ab"}}},
    "missing sha": {"files": {"config.yaml": {"size": 12}}},
    "path leads out": {"files": {"../../../etc/hostname": {"size": 1, "sha256": "ab"}}},
    "absolute path": {"files": {"/etc/hostname": {"size": 1, "sha256": "ab"}}},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_skipped_with_a_warning(
    reference_run, tmp_path: Path, caplog, case: str
) -> None:
    latest = two_checkpoints(reference_run, tmp_path)
    (latest / ckpt.MANIFEST).write_text(json.dumps(MALFORMED[case]))
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_5"
    assert "Skipping checkpoint" in caplog.text and "step_6" in caplog.text
    assert ckpt.apply_retention(tmp_path, None, 1, False) == []  # the broken one is not ranked


def test_malformed_training_info_is_skipped(reference_run, tmp_path: Path) -> None:
    latest = two_checkpoints(reference_run, tmp_path)
    (latest / ckpt.INFO).write_text(json.dumps([1, 2]))
    ckpt.write_manifest(latest)  # consistent hashes, wrong shape
    assert "malformed" in str(ckpt.verify(latest))
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_5"


def test_symlinks_never_lead_out(reference_run, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    two_checkpoints(reference_run, outside / "victim")  # a checkpoint-looking tree elsewhere
    work = tmp_path / "ckpt"
    latest = two_checkpoints(reference_run, work)
    (work / "step_9").symlink_to(outside / "victim" / "step_6")  # a whole step as a link
    (work / "tmp_step_11").symlink_to(outside / "victim" / "step_5")
    weights = latest / "policy" / "weights" / "model.safetensors"
    target = outside / "model.safetensors"
    shutil.copy(weights, target)
    weights.unlink()
    weights.symlink_to(target)  # one file as a link, hashes consistent
    assert "outside the checkpoint" in str(ckpt.verify(latest))
    assert ckpt.latest_checkpoint(work) == work / "step_5"
    ckpt.remove_stale_tmp_dirs(work)
    ckpt.apply_retention(work, None, 1, False)
    assert (outside / "victim" / "step_6" / ckpt.MANIFEST).is_file()
    assert (outside / "victim" / "step_5" / ckpt.MANIFEST).is_file()
    assert target.is_file()


def test_malformed_manifest_does_not_block_resume(reference_run, small_run, tmp_path: Path) -> None:
    latest = two_checkpoints(reference_run, tmp_path / "ckpt")
    (latest / ckpt.MANIFEST).write_text("[]")
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=7")
    assert result.returncode == 0
    assert sorted(result.train_rows()) == [6, 7]


def test_export_refuses_remote_code_named_by_the_checkpoint(
    reference_run, tmp_path: Path, capsys
) -> None:
    from sftkit.cli import export_main as main

    step = tmp_path / "ckpt" / "step_3"
    shutil.copytree(reference_run.checkpoint_dir / "step_3", step)
    config = step / "config.yaml"
    assert "trust_remote_code: false" in config.read_text()
    config.write_text(
        config.read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    )
    ckpt.write_manifest(step)
    capsys.readouterr()
    assert main([str(step), str(tmp_path / "out")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([str(step), str(tmp_path / "out"), "--trust-remote-code"]) == 0
