"""`exp_NNN/curves.png`: the run's curves from its `metrics.jsonl`, drawn at the end of a run
and by `sftkit plot <exp_dir>`. matplotlib is optional (`sftkit[plot]`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger("sftkit")

CURVES_FILE = "curves.png"
PANELS = ("train loss", "validation loss", "learning rate", "gradient norm", "tokens/s")
NO_MATPLOTLIB = (
    "curves.png needs matplotlib: pip install 'sftkit[plot]' (or uv sync --extra plot), "
    "then `sftkit plot <exp_dir>`"
)

Series = dict[str, dict[int, float]]  # name -> {step: value}; a rerun step keeps its last value


def read_series(rows: Iterable[dict[str, Any]]) -> dict[str, Series]:
    """The panels' curves from metrics rows; validation has one curve per set."""
    panels: dict[str, Series] = {name: {} for name in PANELS}

    def put(panel: str, curve: str, step: int, value: Any) -> None:
        if isinstance(value, (int, float)):
            panels[panel].setdefault(curve, {})[step] = float(value)

    for row in rows:
        step = row.get("step")
        if not isinstance(step, int):
            continue
        put("train loss", "train", step, row.get("train/loss"))
        put("learning rate", "lr", step, row.get("train/lr"))
        put("gradient norm", "grad_norm", step, row.get("train/grad_norm"))
        tokens, seconds = (
            row.get("train/global_valid_toks"),
            row.get("timing/train/total_step_time"),
        )
        if tokens is not None and seconds:
            put("tokens/s", "trained tokens/s", step, float(tokens) / float(seconds))
        for key, value in row.items():
            if key.startswith("validation/") and key.endswith("val_loss"):
                name = key.removeprefix("validation/").removesuffix("val_loss").strip("/")
                put("validation loss", name or "all sets", step, value)
    return panels


def draw_curves(panels: dict[str, Series]) -> Any:
    """A matplotlib Figure, one titled axis per panel (no pyplot: no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, title in zip(axes, PANELS, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        for curve, points in panels[title].items():
            steps = sorted(points)
            ax.plot(
                steps,
                [points[s] for s in steps],
                label=curve,
                marker="." if len(steps) < 30 else None,
            )
        if len(panels[title]) > 1:
            ax.legend(fontsize="small")
        if not panels[title]:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[-1].set_axis_off()
    return fig


def save_curves(exp_dir: Path) -> Path:
    """Draw `exp_dir/metrics.jsonl` into `exp_dir/curves.png`; ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    lines = (exp_dir / "metrics.jsonl").read_text().splitlines()
    fig = draw_curves(read_series(json.loads(line) for line in lines if line.strip()))
    FigureCanvasAgg(fig)
    out = exp_dir / CURVES_FILE
    fig.savefig(out, dpi=80)
    return out


def curves_at_end(exp_dir: Path | None) -> None:
    """The end-of-run drawing: one line without matplotlib; a failed drawing is a warning,
    never the exit code of a run that trained."""
    if exp_dir is None:
        return
    try:
        logger.info("Curves: %s", save_curves(exp_dir))
    except ImportError:
        logger.info(NO_MATPLOTLIB)
    except Exception as err:  # noqa: BLE001 - the model is saved; the picture is extra
        logger.warning("could not draw %s: %s", exp_dir / CURVES_FILE, err)
