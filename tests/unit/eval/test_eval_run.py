"""run_eval.py's own steps: the hub probe before a hub benchmark or model."""

from __future__ import annotations

import pytest

import sftkit.hub
from sftkit.eval.config import QUICKSTART_EVAL_CONFIG, load_eval_config
from sftkit.eval.run import offline_if_unreachable


@pytest.fixture
def online_env(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    probes: list[bool] = []
    monkeypatch.setattr(sftkit.hub, "hub_reachable", lambda: probes.append(True) or False)
    monkeypatch.setattr(sftkit.hub, "set_offline", lambda: probes.append(False))
    return probes


def test_a_hub_benchmark_probes_the_hub_and_goes_offline(online_env: list[bool]) -> None:
    assert offline_if_unreachable(load_eval_config(None, []))  # AIME2024, a hub model
    assert online_env == [True, False]  # probed once, then offline


def test_local_model_and_data_do_not_probe(online_env: list[bool], tmp_path) -> None:
    model = tmp_path / "final_hf"
    model.mkdir()
    cfg = load_eval_config(str(QUICKSTART_EVAL_CONFIG), [f"generation.model_name={model}"])
    assert not offline_if_unreachable(cfg) and online_env == []


def test_no_config_offline_names_the_quick_start_eval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sftkit.cli import eval_main

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # no network: the hub benchmark fails at once
    assert eval_main(["data.max_samples=1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error")]
    assert len(errors) == 1  # one line (after the warning listing the ignored vLLM settings)
    assert "data.dataset_name='AIME2024': cannot load it from the hub" in errors[0]
    assert "offline, score the quick start: uv run examples/run_eval.py --config" in errors[0]
