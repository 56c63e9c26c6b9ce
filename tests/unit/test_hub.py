"""Offline, a hub model or dataset fails in seconds with one line, not after retries."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from sftkit import hub
from sftkit.config import load_config
from tests.conftest import _drop_sftkit_handlers

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"
MISSING = "sftkit-tests/no-such-model"


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub endpoint nothing listens on; offline switches are restored after the test."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for name in names:
            if mod is not None and hasattr(mod, name):
                monkeypatch.setattr(mod, name, getattr(mod, name))


def test_local_and_builtin_names_do_not_probe(tmp_path: Path) -> None:
    assert not hub.may_use_hub(["sftkit:tiny-llama", str(tmp_path), None])
    assert hub.may_use_hub(["sftkit:tiny-llama", "meta-llama/Llama-3.2-1B"])


def test_unreachable_hub_model_fails_within_seconds(unreachable_hub: None) -> None:
    from sftkit.data.tokenizer import load_tokenizer

    cfg = load_config(QUICKSTART, [f"policy.model_name={MISSING}"])
    start = time.monotonic()
    assert hub.offline_if_unreachable(cfg)
    with pytest.raises(ValueError, match="policy.tokenizer.name") as err:
        load_tokenizer(cfg.policy)
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)


def test_reachable_or_offline_already_means_no_switch(
    unreachable_hub: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(QUICKSTART, [])  # the built-in model and local data: no probe
    monkeypatch.setattr(hub, "hub_reachable", lambda: pytest.fail("probed"))
    assert not hub.offline_if_unreachable(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(QUICKSTART, [f"policy.model_name={MISSING}"])
    assert not hub.offline_if_unreachable(cfg)


def test_open_assistant_offline_is_one_data_error(unreachable_hub: None) -> None:
    from sftkit.data.datasets.oasst import OasstDataset
    from sftkit.data.errors import DataError

    hub.set_offline()
    start = time.monotonic()
    with pytest.raises(DataError, match=r"open_assistant .*set data_path") as err:
        OasstDataset()
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)


def test_no_config_offline_ends_in_one_line_naming_the_quick_start(
    unreachable_hub: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`run_sft.py` with no --config is NeMo RL's base; offline it says how to start."""
    from sftkit.cli import sft_main

    start = time.monotonic()
    try:
        code = sft_main([f"logger.log_dir={tmp_path}", f"checkpointing.checkpoint_dir={tmp_path}"])
    finally:
        _drop_sftkit_handlers()
    assert time.monotonic() - start < 30  # imports included
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("Error: policy.tokenizer.name='meta-llama/Llama-3.2-1B'")
    assert err[-1].endswith("uv run examples/run_sft.py --config examples/configs/quickstart.yaml)")
