"""Schema defaults equal NeMo RL's, and the NeMo keys sftkit ignores are reported once."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from nemo_fixture_paths import NEMO_BASE, NEMO_CONFIGS
from omegaconf import OmegaConf

from sftkit.config import IGNORED_KEYS, MasterConfig, ignored_settings, load_config
from sftkit.config.checks import schema_paths, schema_type, section_class
from sftkit.config.schema import (
    CHOICES,
    DERIVED_DEFAULTS,
    DIFFERS_FROM_NEMO_SFT_YAML,
    TOKEN_BUDGET_KEYS,
)

MEGATRON_LORA = NEMO_CONFIGS / "recipes/llm/sft-llama3.1-8b-1n8g-megatron-lora.yaml"


def _get(tree: dict[str, Any], path: str) -> Any:
    for seg in path.split("."):
        tree = tree[seg]
    return tree


def _schema_leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of a YAML tree, stopping at schema leaves and free-form fields."""
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and section_class(schema_type(path)) is not None:
            out.extend(_schema_leaves(value, path + "."))
        else:
            out.append(path)
    return out


def _nemo_leaves() -> list[str]:
    raw = OmegaConf.to_container(OmegaConf.load(NEMO_BASE), resolve=False)
    return _schema_leaves(raw)


def test_every_key_of_nemo_sft_yaml_is_in_the_schema() -> None:
    known = set(schema_paths())
    leaves = _nemo_leaves()
    assert len(leaves) > 150  # the whole tree, Megatron included
    assert [p for p in leaves if p not in known] == []


def test_schema_defaults_equal_nemo_sft_yaml() -> None:
    loaded = dataclasses.asdict(load_config(NEMO_BASE))
    defaults = dataclasses.asdict(MasterConfig())
    differs = []
    for path in _nemo_leaves():
        default = _get(defaults, path)
        if path in DERIVED_DEFAULTS:
            assert default is None, path
            default = _get(loaded, DERIVED_DEFAULTS[path])
        elif path in TOKEN_BUDGET_KEYS:
            default = loaded["policy"]["max_total_sequence_length"]
        if _get(loaded, path) != default:
            differs.append(path)
    assert sorted(differs) == sorted(DIFFERS_FROM_NEMO_SFT_YAML)


def test_nemo_derived_values_after_load() -> None:
    cfg = load_config(NEMO_BASE)
    assert cfg.policy.tokenizer.name == "meta-llama/Llama-3.2-1B"
    assert cfg.policy.make_sequence_length_divisible_by == 1
    assert cfg.policy.sequence_packing.train_mb_tokens == 1024
    assert cfg.data.max_input_seq_length == 1024
    assert cfg.policy.megatron_cfg.pipeline_dtype == "bfloat16"
    assert cfg.policy.megatron_cfg.optimizer.clip_grad == 1.0
    assert cfg.policy.megatron_cfg.peft.lora_dtype is None  # the seed's "None" string
    assert cfg.policy.tokenizer.chat_template.startswith("{% for message in messages %}")
    assert cfg.logger.wandb.name == "sft-dev-squad"


def test_tables_name_real_schema_keys() -> None:
    known = set(schema_paths())
    for table in (IGNORED_KEYS, CHOICES, DERIVED_DEFAULTS, DIFFERS_FROM_NEMO_SFT_YAML):
        assert [p for p in table if p not in known] == []
    assert [p for p in DERIVED_DEFAULTS.values() if p not in known] == []
    defaults = dataclasses.asdict(MasterConfig())
    for path, allowed in CHOICES.items():
        assert _get(defaults, path) in (*allowed, None), path


def test_schema_defaults_have_no_ignored_settings() -> None:
    assert ignored_settings(MasterConfig()) == []
    assert ignored_settings(load_config(NEMO_BASE)) == []


def test_ignored_settings_lists_non_default_nemo_keys() -> None:
    cfg = load_config(MEGATRON_LORA)
    found = ignored_settings(cfg)
    assert "policy.megatron_cfg.enabled" in found
    assert "policy.megatron_cfg.tensor_model_parallel_size" in found
    # its optimizer settings are honoured (translated), its dtype settings are not
    assert "policy.megatron_cfg.optimizer.lr" not in found
    assert "policy.dtensor_cfg.enabled" in found
    # peft is acted on; derived values equal to their source are defaults.
    assert not [p for p in found if p.startswith("policy.megatron_cfg.peft")]
    assert "policy.megatron_cfg.scheduler.start_weight_decay" not in found


def test_ignored_settings_logged_in_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(MEGATRON_LORA, ["++policy.dtensor_cfg.env_vars.HF_TOKEN=hf_secretvalue1"])
    records = [r for r in caplog.records if r.name == "sftkit"]
    assert len(records) == 1
    message = records[0].getMessage()
    for path in ignored_settings(cfg):
        assert path in message
    assert "policy.dtensor_cfg.env_vars" in message
    assert "hf_secretvalue1" not in message


def test_no_warning_for_nemo_base(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        load_config(NEMO_BASE)
    assert [r for r in caplog.records if r.name == "sftkit"] == []
