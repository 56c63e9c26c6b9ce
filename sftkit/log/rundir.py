"""Which `logger.log_dir/exp_NNN` a run logs to: a fresh run takes the next number, a resumed
run continues the directory of the run that wrote its checkpoints, so one `metrics.jsonl`
holds the whole run (as one wandb or TensorBoard run would).

Each run directory records its checkpoint directory in `run.json`; a resumed run looks for
the newest directory with the same checkpoint directory. Metrics logged after the step being
resumed (the interrupted run got further than its last save) are dropped from
`metrics.jsonl`, so every step appears once, and a row `{"step": N, "resumed": true}` marks
where the resumed run took over.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from sftkit.log.sinks import next_exp_dir

logger = logging.getLogger("sftkit")

RUN_FILE = "run.json"
# A row `{"step": N, "resumed": true}` in metrics.jsonl marks where a resumed run took over.
RESUMED_KEY = "resumed"
_EXP_DIR = re.compile(r"^exp_(\d+)$")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def run_exp_dir(log_dir: str | Path, checkpoint_dir: str | Path, resume_dir: Path | None) -> Path:
    """The run directory for this run (created), recorded as belonging to `checkpoint_dir`."""
    ckpt = str(Path(checkpoint_dir).resolve())
    if resume_dir is not None:
        found = _previous(Path(log_dir), ckpt)
        if found is not None:
            step = _STEP_DIR.match(resume_dir.name)
            if step:
                _drop_after(found / "metrics.jsonl", int(step.group(1)))
                with (found / "metrics.jsonl").open("a") as f:  # where this run took over
                    f.write(json.dumps({"step": int(step.group(1)), RESUMED_KEY: True}) + "\n")
            logger.info("Resuming: continuing the run directory %s", found)
            return found
    exp_dir = next_exp_dir(log_dir)
    (exp_dir / RUN_FILE).write_text(json.dumps({"checkpoint_dir": ckpt}) + "\n")
    return exp_dir


def _previous(log_dir: Path, checkpoint_dir: str) -> Path | None:
    if not log_dir.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in log_dir.iterdir() if (m := _EXP_DIR.match(p.name))]
    for _, path in sorted(numbered, reverse=True):
        try:
            info = json.loads((path / RUN_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("checkpoint_dir") == checkpoint_dir:
            return path
    return None


def _drop_after(metrics: Path, step: int) -> None:
    """Keep the rows of `metrics` up to `step` (the resumed run logs the later ones again)."""
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step")
        except ValueError:
            continue  # a line cut by the interruption
        if not isinstance(row_step, int) or row_step <= step:
            kept.append(line)
    metrics.write_text("".join(f"{line}\n" for line in kept))
