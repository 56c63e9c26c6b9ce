"""Model loading from local directories and hub ids: names that cannot load say how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.model.load import load_model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_local_directory_loads_with_overrides(model_dir: Path) -> None:
    model = load_model(str(model_dir), config_overrides={"attention_dropout": 0.25})
    assert model.config.attention_dropout == 0.25 and model.config.use_cache is False
    with pytest.raises(ValueError, match=r"hf_config_overrides.no_such_field: LlamaConfig"):
        load_model(str(model_dir), config_overrides={"no_such_field": 1})


def test_unreachable_or_broken_names_are_config_errors(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # No network here; offline mode fails at once instead of retrying the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"policy.model_name='sftkit-test/absent' cannot be "
                       r"loaded .*local directory.*hf download sftkit-test/absent"):  # fmt: skip
        load_model("sftkit-test/absent")
    (model_dir / "model.safetensors").unlink()  # config without weights
    with pytest.raises(ValueError, match=r"cannot be loaded"):
        load_model(str(model_dir))
    with pytest.raises(ValueError, match=r"cannot be loaded"):
        load_model(str(model_dir.parent / "nowhere"))
