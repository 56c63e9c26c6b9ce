"""The score goes to the training run it measures: which exp_NNN, which step, which name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkit.eval.track import log_to_run, metric_names, run_dir


def fake_run(log_dir: Path, n: int, checkpoint_dir: Path, last_step: int) -> Path:
    exp = log_dir / f"exp_{n:03d}"
    exp.mkdir(parents=True)
    (exp / "run.json").write_text(json.dumps({"checkpoint_dir": str(checkpoint_dir.resolve())}))
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, last_step + 1)]
    (exp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return exp


def test_metric_names() -> None:
    result = {"dataset": "AIME2024", "metric": "pass@k", "k": 1, "score": 0.25}
    assert metric_names(result) == {"eval/AIME2024/pass@1": 0.25}
    local = {"dataset": "data/held_out.jsonl", "metric": "exact_match", "k": 1, "score": 1}
    assert metric_names(local) == {"eval/held_out/exact_match": 1.0}


def test_the_models_run_and_step(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    ours = fake_run(logs, 1, tmp_path / "ckpt_a", last_step=6)
    fake_run(logs, 2, tmp_path / "ckpt_b", last_step=9)  # newer, another run's
    assert run_dir(logs, str(tmp_path / "ckpt_a" / "final_hf")) == ours
    assert run_dir(ours, "anything") == ours  # an exp_NNN itself
    # no saved training config here (no step_N/config.yaml): metrics.jsonl only
    log_to_run(str(logs), str(tmp_path / "ckpt_a" / "step_4"), {"eval/x/pass@1": 0.5})
    log_to_run(str(logs), str(tmp_path / "ckpt_a" / "final_adapter"), {"eval/x/pass@1": 0.75})
    rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval/x/pass@1"]) for r in rows if "eval/x/pass@1" in r] == [
        (4, 0.5), (6, 0.75),  # step_4 at 4; a final model at the run's last step
    ]  # fmt: skip


def test_a_directory_without_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no training run"):
        run_dir(tmp_path, "final_hf")
