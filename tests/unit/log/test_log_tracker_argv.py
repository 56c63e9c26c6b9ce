"""Secrets on the command line stay out of trackers (wandb records sys.argv), and dataset
names that MLflow rejects become names it accepts, one per dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sftkit.log import MlflowSink, WandbSink
from sftkit.log.redact import redact_argv
from sftkit.log.trackers import mlflow_name

SECRET = "canary-argv-secret-9d1e"
URL_PASSWORD = "canary-url-pw-4c2b"
ARGV = [
    "sftkit",
    "train",
    f"++logger.wandb.api_key={SECRET}",
    f"logger.mlflow.tracking_uri=https://bob:{URL_PASSWORD}@mlflow.example.com",
    "--hf-token",
    SECRET + "-2",
    "sft.max_num_steps=3",
]


def test_redact_argv_hides_secret_overrides_options_and_url_passwords() -> None:
    assert redact_argv(ARGV) == [
        "sftkit",
        "train",
        "++logger.wandb.api_key=***",
        "logger.mlflow.tracking_uri=https://bob:***@mlflow.example.com",
        "--hf-token",
        "***",
        "sft.max_num_steps=3",
    ]


def _leaks(root: Path) -> list[Path]:
    secrets = (SECRET.encode(), URL_PASSWORD.encode())
    return [p for p in root.rglob("*") if p.is_file() for s in secrets if s in p.read_bytes()]


def test_wandb_offline_run_files_hold_no_argv_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    argv = [__file__, *ARGV[1:]]  # wandb records the arguments of an existing program file
    monkeypatch.setattr(sys, "argv", list(argv))
    import wandb

    seen: list[list[str]] = []
    real_init = wandb.init

    def init(*args: object, **kwargs: object) -> object:
        seen.append(list(sys.argv))  # what wandb records (its metadata is written later)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    sink = WandbSink(tmp_path, {"sft": {"max_num_steps": 3}}, project="p", name="n", mode="offline")
    sink.log({"train/loss": 1.0}, step=1)
    sink.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert seen == [[__file__, *redact_argv(ARGV[1:])]]
    assert _leaks(tmp_path) == []
    assert sys.argv == argv  # restored for the rest of the run


def test_mlflow_store_holds_no_argv_secret_and_takes_any_dataset_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(sys, "argv", list(ARGV))
    names = ["../escape", "line\nbreak", "n" * 300, "n" * 299 + "m", "./a//b", "plain"]
    config = {
        "data": {"validation": [{"name": n} for n in names]},
        f"https://u:{URL_PASSWORD}@h": 1,
    }
    sink = MlflowSink(tmp_path, config, experiment_name="exp", run_name="run")
    sink.log({f"validation/{n}/val_loss": 1.0 + i for i, n in enumerate(names)}, step=1)
    sink.close()
    run = MlflowClient(tracking_uri=(tmp_path / "mlflow").resolve().as_uri()).get_run(sink.run_id)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("validation/")}
    assert sorted(logged.values()) == [1.0 + i for i in range(len(names))]  # none merged
    assert "validation/plain/val_loss" in logged
    assert all(len(k) <= 250 for k in logged)
    assert _leaks(tmp_path) == []


@pytest.mark.parametrize("name", ["../x", "/abs", "a/./b", "a//b", "x\ny", "é" * 300, ".."])
def test_mlflow_names_normalise_to_themselves(name: str) -> None:
    import posixpath

    key = mlflow_name(f"validation/{name}/val_loss")
    assert posixpath.normpath(key) == key and not key.startswith(("/", ".."))
    assert len(key) <= 250
