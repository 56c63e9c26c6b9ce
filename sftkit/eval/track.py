"""A score logged to the training run it measures: `logger.log_dir=<the run's log dir>`.

The run directory is `log_dir` itself when it holds `metrics.jsonl`, else its `exp_NNN` that
recorded the evaluated model's checkpoint directory (`run.json`), else its newest. The score
goes to that run's `metrics.jsonl` at the checkpoint's step (`step_N`: N; `final_hf`,
`final_adapter`: the run's last step) and to the trackers the run's saved `config.yaml`
enables (TensorBoard in the same directory; wandb and MLflow start a run of the same name).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from sftkit.checkpoint.layout import CheckpointLayout, StepDir

logger = logging.getLogger("sftkit")

_EXP = re.compile(r"^exp_(\d+)$")
_STEP = re.compile(r"^step_(\d+)$")


def metric_names(result: dict[str, Any]) -> dict[str, float]:
    """`eval/<benchmark>/<metric>` (`pass@1`, `cons@4`, `exact_match`) -> the score."""
    dataset = str(result["dataset"])
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    metric = str(result["metric"]).replace("@k", f"@{result['k']}")
    return {f"eval/{name}/{metric}": float(result["score"])}


def run_dir(log_dir: Path, model_name: str) -> Path:
    """The `exp_NNN` of `log_dir` that belongs to the evaluated model's run."""
    if (log_dir / "metrics.jsonl").is_file():
        return log_dir
    runs = sorted(
        ((int(m.group(1)), p) for p in _children(log_dir) if (m := _EXP.match(p.name))),
        reverse=True,
    )
    if not runs:
        raise ValueError(
            f"logger.log_dir={str(log_dir)!r} holds no training run (no metrics.jsonl, no "
            "exp_NNN): give the training run's logger.log_dir or one of its exp_NNN."
        )
    checkpoint_dir = _checkpoint_dir(Path(model_name).expanduser())
    for _, path in runs:
        if checkpoint_dir is not None and _recorded_checkpoint_dir(path) == checkpoint_dir:
            return path
    return runs[0][1]


def _children(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _checkpoint_dir(model: Path) -> str | None:
    """The checkpoint directory `model` came from: the parent of `final_hf`,
    `final_adapter` or `step_N`, or `model` when it holds step_N directories."""
    if model.name in ("final_hf", "final_adapter") or _STEP.match(model.name):
        return str(model.parent.resolve())
    if CheckpointLayout(model).holds_checkpoints():
        return str(model.resolve())
    return None


def _recorded_checkpoint_dir(exp_dir: Path) -> str | None:
    try:
        info = json.loads((exp_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return info.get("checkpoint_dir") if isinstance(info, dict) else None


def _step(model: Path, exp_dir: Path) -> int:
    match = _STEP.match(model.name)
    if match:
        return int(match.group(1))
    steps = [0]
    metrics = exp_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                steps.append(row["step"])
    return max(steps)


def _run_config(exp_dir: Path, model: Path) -> Any:
    """The run's saved config (its `step_N/config.yaml`), or None when there is none."""
    from sftkit.config import load_config

    recorded = _recorded_checkpoint_dir(exp_dir)
    candidates = [model] if _STEP.match(model.name) else []
    if recorded:
        latest = CheckpointLayout(Path(recorded)).latest()
        candidates += [latest] if latest is not None else []
    for step_dir in candidates:
        path = StepDir(step_dir).config
        if path.is_file():
            try:
                return load_config(path)
            except ValueError as err:  # a run of an older sftkit: its metrics file still works
                logger.warning("cannot read %s (%s): logging to metrics.jsonl only", path, err)
                return None
    return None


def log_to_run(log_dir: str, model_name: str, metrics: dict[str, float]) -> Path:
    """Log `metrics` to the training run in `log_dir`; returns its run directory."""
    from sftkit.config import config_to_dict
    from sftkit.log.loggers import Loggers, build_loggers
    from sftkit.log.sinks import JsonlSink

    model = Path(model_name).expanduser()
    exp_dir = run_dir(Path(log_dir).expanduser(), model_name)
    step = _step(model, exp_dir)
    cfg = _run_config(exp_dir, model)
    if cfg is None:
        logger.info(
            "no saved training config for %s: the score goes to metrics.jsonl only", exp_dir
        )
        loggers = Loggers([JsonlSink(exp_dir)], exp_dir)
    else:
        loggers = build_loggers(cfg.logger, exp_dir, config_to_dict(cfg))
    with loggers:
        loggers.log(metrics, step)
    logger.info("logged %s at step %d to %s", ", ".join(metrics), step, exp_dir)
    return exp_dir
