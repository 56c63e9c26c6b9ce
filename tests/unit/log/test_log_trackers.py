"""wandb offline with a planted canary secret, MLflow local store, unreachable servers."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from sftkit.config.schema import LoggerConfig
from sftkit.log import (
    MlflowSink,
    WandbSink,
    build_loggers,
    check_reachable,
    read_jsonl,
    setup_logging,
)

CANARY_KEY = "canary-wandb-key-7f3a9c21"
CANARY_TOKEN = "canary-hf-token-55be0d3e"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends


def test_wandb_offline_without_api_key_keeps_secrets_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # must not be used
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` either
    config = {"policy": {"model_name": "tiny"}, "extra": {"hf_token": CANARY_TOKEN}}

    # No API key: offline, no network, and a run directory under exp_dir/wandb.
    probe = WandbSink(tmp_path / "a", config, project="p", name="n")
    assert probe.mode == "offline"
    probe.log({"train/loss": 1.0}, step=1)
    probe.close()
    assert list((tmp_path / "a" / "wandb" / "wandb").glob("offline-run-*"))

    # A key in the environment (forced offline: no network here) and a token in the config,
    # both also said in a log line: none may reach any file wandb writes.
    monkeypatch.setenv("WANDB_API_KEY", CANARY_KEY)
    monkeypatch.setenv("HF_TOKEN", CANARY_TOKEN)
    cfg = LoggerConfig(wandb_enabled=True, tensorboard_enabled=False)
    cfg.wandb.mode = "offline"
    loggers = build_loggers(cfg, tmp_path / "b", config, rank=0)
    logger = setup_logging()  # a stderr handler, which wandb's console capture records
    logger.warning("key=%s token=%s", CANARY_KEY, CANARY_TOKEN)
    loggers.log({"train/loss": 0.75, "train/lr": 1e-4}, step=1)
    loggers.close()
    run_dirs = list((tmp_path / "b" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    files = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    leaks = [p for p in files for c in (CANARY_KEY, CANARY_TOKEN) if c.encode() in p.read_bytes()]
    assert leaks == []
    output_log = next(run_dirs[0].rglob("output.log")).read_text()
    assert "key=*** token=***" in output_log  # the line was captured, scrubbed
    assert not (tmp_path / "elsewhere").exists()


def test_mlflow_local_store_has_metrics_and_redacted_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    config = {
        "sft": {"max_num_steps": 3},
        "env": {"api_key": CANARY_KEY},
        "logger": {"uri": "https://bob:pw-in-url-1234@mlflow.example.com"},
    }
    sink = MlflowSink(tmp_path, config, experiment_name="exp", run_name="run", tracking_uri=None)
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.0)]:
        sink.log({"train/loss": loss, "train/grad_norm": float("nan")}, step)
    sink.close()

    client = MlflowClient(tracking_uri=(tmp_path / "mlflow").resolve().as_uri())
    run = client.get_run(sink.run_id)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    history = client.get_metric_history(sink.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert client.get_metric_history(sink.run_id, "train/grad_norm") == []  # NaN skipped
    assert run.data.params["sft.max_num_steps"] == "3"
    assert run.data.params["env.api_key"] == "***"
    assert run.data.params["logger.uri"] == "https://bob:***@mlflow.example.com"
    assert not any(
        secret in p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file()
        for secret in (CANARY_KEY.encode(), b"pw-in-url-1234")
    )


def test_unreachable_mlflow_server_fails_fast_and_clearly(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = LoggerConfig(mlflow_enabled=True, tensorboard_enabled=True)
    cfg.mlflow.tracking_uri = uri
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        build_loggers(cfg, tmp_path, {}, rank=0)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "tracking_uri=null" in message and "mlflow_enabled=false" in message
    # The sinks opened before the failure were closed (the jsonl file is complete).
    assert read_jsonl(tmp_path / "metrics.jsonl") == []


def test_check_reachable_accepts_any_http_answer() -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
        check_reachable("file:///nonexistent/store")  # not probed
        with pytest.raises(ConnectionError):
            check_reachable(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No wandb settings, no netrc; an unreachable wandb server."""
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_wandb_mode_follows_wandb_rules(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sftkit.log import trackers

    # No credentials at all: offline, said once with how to upload.
    mode, note = trackers.decide_wandb_mode(None, wandb_env)
    assert mode == "offline" and note and "no credentials" in note and "wandb sync" in note
    # `wandb login`'s netrc entry counts as credentials: then the server decides (here down).
    (wandb_env / "netrc").write_text("machine 127.0.0.1 login user password secret-key\n")
    start = time.monotonic()
    mode, note = trackers.decide_wandb_mode(None, wandb_env)
    assert mode == "offline" and note and "unreachable" in note
    assert time.monotonic() - start < 10
    # WANDB_MODE and logger.wandb.mode decide when set; no probe for offline.
    monkeypatch.setattr(trackers, "wandb_reachable", lambda: pytest.fail("probed"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.decide_wandb_mode(None, wandb_env) == ("offline", None)
    assert trackers.decide_wandb_mode("disabled", wandb_env) == ("disabled", None)
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert trackers.decide_wandb_mode(None, wandb_env) == ("offline", None)


def test_wandb_online_forced_with_server_down_is_one_line(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sftkit.log import trackers

    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConnectionError, match=r"WANDB_MODE=online but the wandb server") as err:
        trackers.decide_wandb_mode(None, wandb_env)
    assert "\n" not in str(err.value)


def test_wandb_key_without_network_runs_offline_without_hanging(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", CANARY_KEY)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="sftkit"):
        sink = WandbSink(wandb_env / "exp", {}, project="p", name="n")
    sink.log({"train/loss": 1.0}, step=1)
    sample = {"step": 1, "prompt": "12+34=", "reference": "46", "generated": "46"}
    sink.log_samples([sample], step=1)  # a wandb table
    sink.close()
    assert sink.mode == "offline"
    assert time.monotonic() - start < 60  # wandb's offline start included
    notes = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(notes) == 1 and "unreachable: logging offline" in notes[0]
