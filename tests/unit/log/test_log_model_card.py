"""The model card's parts that read files: the base's license and the logged losses."""

from __future__ import annotations

import json
from pathlib import Path

from sftkit.log.model_card import base_license, final_validation_losses


def test_license_from_config_or_readme_front_matter(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert base_license(str(tmp_path)) is None
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# Model\n")
    assert base_license(str(tmp_path)) == "apache-2.0"
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert base_license(str(tmp_path)) == "mit"
    assert base_license("no/such-model-anywhere") is None  # no network, no cache: none


def test_final_validation_losses_are_the_last_logged(tmp_path: Path) -> None:
    rows = [{"step": 2, "validation/val_loss": 2.0}, {"step": 4, "train/loss": 1.0},
            {"step": 6, "validation/val_loss": 1.5, "validation/a/val_loss": 1.4}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert final_validation_losses(tmp_path) == {
        "validation/val_loss": (6, 1.5), "validation/a/val_loss": (6, 1.4)}  # fmt: skip
