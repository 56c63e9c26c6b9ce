"""Experiment trackers as metric sinks: Weights & Biases and MLflow.

Each is imported only when enabled, writes under the run directory (`exp_dir/wandb`,
`exp_dir/mlflow`) unless a server is configured, and receives the run config redacted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sftkit.log.redact import redact, redacted_argv, scrub
from sftkit.log.sinks import to_number

log = logging.getLogger("sftkit")

# Long enough for a server on the same network, short enough that a typo fails at once.
PROBE_TIMEOUT_S = 5.0
# MLflow rejects longer parameter values.
_MLFLOW_PARAM_MAX = 500
_MLFLOW_BATCH = 100
# Characters MLflow accepts in parameter and metric names; others become "_".
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /:]")
_MLFLOW_KEY_MAX = 250  # MLflow rejects longer parameter and metric names


def mlflow_name(name: str) -> str:
    """`name` as MLflow accepts it: safe characters, no `.`/`..`/empty path segments (MLflow
    rejects names that normalise to another path, e.g. a dataset named `../x`), at most
    250 characters (a hash of the full name keeps long names apart)."""
    key = _MLFLOW_UNSAFE.sub("_", name)
    key = "/".join({"": "_", ".": "_", "..": "__"}.get(part, part) for part in key.split("/"))
    if len(key) > _MLFLOW_KEY_MAX:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        key = f"{key[: _MLFLOW_KEY_MAX - 9]}-{digest}"
    return key


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


WANDB_DEFAULT_URL = "https://api.wandb.ai"
_WANDB_MODES = {
    "online": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL


def wandb_credentials() -> bool:
    """Whether wandb would find an API key: `WANDB_API_KEY`, or `wandb login`'s netrc entry
    for the server (`WANDB_BASE_URL`'s host; the netrc file is `NETRC` or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = urlparse(_wandb_base_url()).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the wandb server opens within `timeout` seconds."""
    url = urlparse(_wandb_base_url())
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def decide_wandb_mode(mode: str | None, run_dir: str | Path) -> tuple[str, str | None]:
    """(mode, note to log once) by wandb's own rules; sftkit never overrides them.

    `logger.wandb.mode`, then `WANDB_MODE`, decide when set (an explicit online mode with the
    server unreachable is a one-line `ConnectionError`, not a hang). Otherwise credentials
    (`WANDB_API_KEY`, `wandb login`) mean online; none means offline, said once; credentials
    with the server unreachable mean offline with a warning, so a run never waits on wandb.
    """
    sync = f"upload it later with `wandb sync {Path(run_dir) / 'wandb'}/offline-run-*`"
    chosen = mode or os.environ.get("WANDB_MODE")
    if chosen:
        if chosen not in _WANDB_MODES:
            source = "logger.wandb.mode" if mode else "WANDB_MODE"
            raise ValueError(
                f"{source}={chosen!r} is not a wandb mode: use online, offline or disabled"
            )
        chosen = _WANDB_MODES[chosen]
        if chosen == "online" and not wandb_reachable():
            source = "logger.wandb.mode" if mode else "WANDB_MODE"
            raise ConnectionError(
                f"{source}=online but the wandb server {_wandb_base_url()} is unreachable; "
                "fix the network or WANDB_BASE_URL, or set WANDB_MODE=offline (then `wandb "
                "sync`) or logger.wandb_enabled=false."
            )
        return chosen, None
    if not wandb_credentials():
        return "offline", (
            "wandb: no credentials (WANDB_API_KEY or `wandb login`): logging offline; " + sync
        )
    if not wandb_reachable():
        return "offline", (
            f"wandb: the server {_wandb_base_url()} is unreachable: logging offline; " + sync
        )
    return "online", None


class WandbSink:
    """A wandb run in `exp_dir/wandb`, online or offline by wandb's rules
    (`decide_wandb_mode`). Offline runs can be uploaded later with
    `wandb sync <exp_dir>/wandb/offline-run-*`.
    """

    def __init__(
        self,
        exp_dir: str | Path,
        config: dict[str, Any],
        project: str,
        name: str,
        entity: str | None = None,
        mode: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "logger.wandb_enabled=true needs the wandb package: pip install 'sftkit[wandb]' "
                "(or set logger.wandb_enabled=false)"
            ) from e
        mode, note = decide_wandb_mode(mode, exp_dir)
        if note:
            log.warning("%s", note)
        self.dir = Path(exp_dir) / "wandb"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        with redacted_argv():  # wandb records sys.argv in the run's metadata
            self._run = self._init(wandb, config, project, name, entity, mode)
        log.info("wandb run %s (%s) in %s", self._run.name, mode, self.dir)

    def _init(
        self, wandb: Any, config: dict[str, Any], project: str, name: str,
        entity: str | None, mode: str,
    ) -> Any:  # fmt: skip
        return wandb.init(
            project=scrub(project),
            name=scrub(name),
            entity=entity,
            dir=str(self.dir),
            mode=mode,  # checked in decide_wandb_mode
            config=redact(config),
            # Code and git state are not uploaded: they may hold secrets; the config is enough.
            settings=wandb.Settings(save_code=False, disable_git=True, quiet=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        values = {name: to_number(v) for name, v in metrics.items()}
        self._run.log({k: v for k, v in values.items() if v is not None}, step=step)

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        """Validation samples as a wandb table (`val_samples`) at `step`."""
        import wandb

        columns: list[str | int] = ["step", "prompt", "reference", "generated"]
        table = wandb.Table(columns=columns, data=[[r[str(c)] for c in columns] for r in records])
        self._run.log({"val_samples": table}, step=step)

    def close(self) -> None:
        self._run.finish()


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise `ConnectionError` unless an HTTP(S) server answers at `uri` within `timeout`.

    Any HTTP answer counts, even an error status: the server is there. Non-HTTP URIs
    (files, databases, `databricks`) are not probed.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"MLflow tracking server logger.mlflow.tracking_uri={uri} is unreachable "
            f"({reason}). Start it (e.g. `mlflow server --port 5000`), fix the URI, set "
            "logger.mlflow.tracking_uri=null for a local store under the run directory, or "
            "logger.mlflow_enabled=false."
        ) from e


class MlflowSink:
    """An MLflow run: a local file store in `exp_dir/mlflow` unless `tracking_uri` is set.

    A set server is probed before any MLflow call, so a wrong URI fails in seconds instead
    of after MLflow's retries. View a local store with
    `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <exp_dir>/mlflow`.
    """

    def __init__(
        self,
        exp_dir: str | Path,
        config: dict[str, Any],
        experiment_name: str,
        run_name: str,
        tracking_uri: str | None = None,
    ) -> None:
        if tracking_uri:
            check_reachable(tracking_uri)
        else:
            local = (Path(exp_dir) / "mlflow").resolve()
            local.mkdir(parents=True, exist_ok=True)
            tracking_uri = local.as_uri()
            # MLflow 3 refuses file stores unless asked; mlflow-skinny has no SQL backend.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError(
                "logger.mlflow_enabled=true needs mlflow: pip install 'sftkit[mlflow]' "
                "(or set logger.mlflow_enabled=false)"
            ) from e
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri)
        experiment_name, run_name = scrub(experiment_name), scrub(run_name)
        experiment = self._client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self._client.create_experiment(experiment_name)
        )
        with redacted_argv():
            run = self._client.create_run(experiment_id, run_name=run_name)
        self.run_id: str = run.info.run_id
        params = [
            Param(mlflow_name(key), str(value)[:_MLFLOW_PARAM_MAX])
            for key, value in flatten(redact(config)).items()
        ]
        for i in range(0, len(params), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, params=params[i : i + _MLFLOW_BATCH])
        log.info("mlflow run %s at %s", self.run_id, tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_name(name), float(value), now, step)
            for name, v in metrics.items()
            if (value := to_number(v)) is not None
        ]
        for i in range(0, len(batch), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[i : i + _MLFLOW_BATCH])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)
