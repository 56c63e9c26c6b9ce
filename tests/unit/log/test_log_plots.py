"""curves.png: the named panels from metrics.jsonl, a PNG that decodes, `sftkit plot`, and
one line saying how to get matplotlib when it is missing."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from sftkit.cli import main as cli_main
from sftkit.log.plots import NO_MATPLOTLIB, PANELS, curves_at_end, draw_curves, read_series


def _metrics(exp: Path) -> Path:
    exp.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 0, "validation/val_loss": 3.0, "validation/a/val_loss": 3.1}]
    for step in range(1, 5):
        rows.append(
            {"step": step, "train/loss": 3.0 - step / 2, "train/lr": 1e-4 * step,
             "train/grad_norm": 2.0 / step, "train/global_valid_toks": 100 * step,
             "timing/train/total_step_time": 0.5}
        )  # fmt: skip
    rows.append({"step": 4, "validation/val_loss": 1.0, "validation/a/val_loss": 1.1})
    (exp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return exp


def test_panels_hold_the_run_curves(tmp_path: Path) -> None:
    lines = (_metrics(tmp_path / "exp_001") / "metrics.jsonl").read_text().splitlines()
    panels = read_series(json.loads(line) for line in lines)
    assert panels["validation loss"] == {"all sets": {0: 3.0, 4: 1.0}, "a": {0: 3.1, 4: 1.1}}
    assert panels["tokens/s"]["trained tokens/s"][2] == pytest.approx(400.0)
    fig = draw_curves(panels)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == list(PANELS)
    loss_axis = fig.axes[PANELS.index("train loss")]
    assert list(loss_axis.lines[0].get_ydata()) == [2.5, 2.0, 1.5, 1.0]


def test_sftkit_plot_redraws_a_png_that_decodes(tmp_path: Path, capsys) -> None:
    from matplotlib.image import imread

    exp = _metrics(tmp_path / "exp_001")
    assert cli_main(["plot", str(exp)]) == 0
    assert capsys.readouterr().out.strip() == str(exp / "curves.png")
    image = imread(exp / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_without_matplotlib_one_line_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    exp = _metrics(tmp_path / "exp_001")
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    with caplog.at_level(logging.INFO, logger="sftkit"):
        curves_at_end(exp)  # the end of a run: no failure, one line
    assert [r.getMessage() for r in caplog.records] == [NO_MATPLOTLIB]
    assert not (exp / "curves.png").exists()
    assert cli_main(["plot", str(exp)]) == 2
    assert "pip install 'sftkit[plot]'" in capsys.readouterr().err
