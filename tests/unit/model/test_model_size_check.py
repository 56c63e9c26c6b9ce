"""A model config that cannot fit is refused in one line before anything is allocated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

from sftkit.model.load import load_model
from sftkit.model.parallel import build_meta_model
from sftkit.model.size_check import estimate_parameters

SMALL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    LlamaConfig(**SMALL).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize(
    "override",
    [
        {"num_hidden_layers": 10**7},
        {"hidden_size": 10**9, "num_attention_heads": 1},
        {"vocab_size": 2**40},
        {"intermediate_size": 10**13},
        {"num_hidden_layers": 5000, "hidden_size": 65536, "num_attention_heads": 64},
    ],
)
@pytest.mark.parametrize("sharded", [False, True], ids=["load", "meta"])
def test_absurd_sizes_are_refused_before_allocating(
    model_dir: Path, override: dict[str, int], sharded: bool
) -> None:
    build = build_meta_model if sharded else load_model
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"policy\.model_name=.*hf_config_overrides") as err:
        build(str(model_dir), param_dtype=__import__("torch").float32, trust_remote_code=False,
              attn_implementation=None, config_overrides=override)  # fmt: skip
    assert time.monotonic() - start < 20
    assert len(str(err.value).splitlines()) == 1
    key, value = next(iter(override.items()))
    assert f"{key}={value}" in str(err.value)


def test_a_small_model_still_loads_and_the_estimate_is_close() -> None:
    for config in (LlamaConfig(**SMALL), Qwen2MoeConfig(**SMALL, num_experts=4,
                                                         moe_intermediate_size=16, shared_expert_intermediate_size=24)):  # fmt: skip
        actual = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        assert 0.7 * actual <= estimate_parameters(config) <= 1.1 * actual, type(config)


def test_a_small_config_still_builds(model_dir: Path) -> None:
    model = build_meta_model(str(model_dir), param_dtype=__import__("torch").float32,
                             trust_remote_code=False, attn_implementation=None,
                             config_overrides={"num_hidden_layers": 3})  # fmt: skip
    assert len(model.model.layers) == 3
