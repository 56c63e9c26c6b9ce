"""Model loading from local directories and hub ids: names that cannot load say how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from sftkit.model.load import keep_attention_softcap, load_model


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


def test_turning_off_a_router_loss_the_model_lacks_is_said_and_ignored(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NeMo RL's Nemotron-3 Nano recipes set `router_aux_loss_coef: 0.0` on a config without
    the field: a no-op, said once. A non-zero value is still refused."""
    with caplog.at_level("WARNING", logger="sftkit"):
        model = load_model(str(model_dir), config_overrides={"router_aux_loss_coef": 0.0})
    assert not hasattr(model.config, "router_aux_loss_coef")
    assert [r.getMessage() for r in caplog.records if "nothing to turn off" in r.getMessage()] == [
        "policy.hf_config_overrides.router_aux_loss_coef=0.0: LlamaConfig has no such field and "
        "its model adds no router loss, so there is nothing to turn off; ignored"
    ]
    with pytest.raises(ValueError, match=r"router_aux_loss_coef: LlamaConfig has no field"):
        load_model(str(model_dir), config_overrides={"router_aux_loss_coef": 0.01})


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


def test_sdpa_is_replaced_where_it_would_drop_the_attention_softcap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """transformers 5.17 runs Gemma2 on SDPA, whose path ignores attn_logit_softcapping."""
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, attn_logit_softcapping=50.0))
    gemma.config._attn_implementation = "sdpa"  # what 5.17 picks by default
    with caplog.at_level("WARNING", logger="sftkit"):
        keep_attention_softcap(gemma)
    assert gemma.config._attn_implementation == "eager"
    assert "attn_logit_softcapping=50.0, which SDPA attention ignores" in caplog.text
    uncapped = Gemma2ForCausalLM(Gemma2Config(**small, attn_logit_softcapping=None))
    uncapped.config._attn_implementation = "sdpa"
    keep_attention_softcap(uncapped)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    llama.config._attn_implementation = "sdpa"
    keep_attention_softcap(llama)
    assert uncapped.config._attn_implementation == llama.config._attn_implementation == "sdpa"


def test_loading_weights_reports_progress(
    model_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block by block (several ranks): a line per quarter of the bytes, then a closing line;
    one process (transformers reads the files): the closing line with size and time."""
    import functools

    from sftkit.log.progress import Progress
    from sftkit.model import load, parallel

    monkeypatch.setattr(load, "Progress", functools.partial(Progress, quiet_s=0.0, bar=False))
    with caplog.at_level("INFO", logger="sftkit"):
        model = load_model(str(model_dir), progress=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading")]
    assert len(done) == 1 and done[0].startswith(f"loading weights: done, {size / 1000:.1f} KB")
    caplog.clear()
    fresh = LlamaForCausalLM(model.config)
    with caplog.at_level("INFO", logger="sftkit"):
        parallel.load_sharded_weights(fresh, sorted(model_dir.glob("*.safetensors")), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading")]
    assert any("%" in line and "eta" in line for line in lines), lines
    assert lines[-1].startswith("loading weights: done")
    for name, param in fresh.state_dict().items():
        assert param.equal(model.state_dict()[name]), name  # the weights themselves
