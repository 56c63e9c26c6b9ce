"""Derived values are filled once at load (`config/derive.py`), printed, and read back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sftkit.config import ConfigError, config_to_yaml, load_config
from sftkit.config.checks import unmeasured_saves

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"
MEGATRON_LORA = (
    REPO / "tests/fixtures/nemo_configs/recipes/llm/sft-llama3.1-8b-1n8g-megatron-lora.yaml"
)


def test_derived_values_are_filled_and_printed(tmp_path: Path) -> None:
    cfg = load_config(QUICKSTART, ["~data.max_input_seq_length", "policy.train_micro_batch_size=8"])
    assert cfg.data.max_input_seq_length == cfg.policy.max_total_sequence_length == 64
    assert cfg.policy.sequence_packing.train_mb_tokens == 64 * 8
    assert cfg.policy.dynamic_batching.train_mb_tokens == 64 * 8
    assert cfg.data.max_row_chars == 1_000_000
    text = config_to_yaml(cfg)  # what --print-config prints
    assert "max_input_seq_length: 64" in text and "max_row_chars: 1000000" in text
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(printed) == cfg
    # a set value wins; the row cap follows the effective limit
    long = load_config(QUICKSTART, ["data.max_input_seq_length=200000"])
    assert long.data.max_row_chars == 1_600_000


def test_megatron_peft_is_translated_into_lora_cfg_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(MEGATRON_LORA)
    lora, peft = cfg.policy.dtensor_cfg.lora_cfg, cfg.policy.megatron_cfg.peft
    assert lora.enabled and peft.enabled
    assert (lora.dim, lora.alpha, lora.dropout) == (peft.dim, peft.alpha, peft.dropout)
    assert lora.lora_dtype == "float32" and lora.match_all_linear == (not peft.target_modules)
    printed = tmp_path / "printed.yaml"
    printed.write_text(config_to_yaml(cfg))
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        again = load_config(printed)
    assert again.policy.dtensor_cfg.lora_cfg == lora
    assert "lora_cfg is ignored" not in caplog.text  # the translation is not the user's


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["policy.dtensor_cfg.lora_cfg.enabled=true", "policy.dtensor_cfg.lora_cfg.dim=0"],
         "policy.dtensor_cfg.lora_cfg.dim"),
        (["policy.dtensor_cfg.lora_cfg.enabled=true", "policy.dtensor_cfg.lora_cfg.dropout=1.0"],
         "policy.dtensor_cfg.lora_cfg.dropout"),
        (["policy.megatron_cfg.peft.dim=-4"], "policy.megatron_cfg.peft.dim"),
        # LoRA on experts: a weight delta (no dropout), not split over tensor-parallel ranks
        (["policy.dtensor_cfg.lora_cfg.enabled=true", "++policy.dtensor_cfg.lora_cfg.target_experts=true",
          "policy.dtensor_cfg.lora_cfg.dropout=0.1"], "policy.dtensor_cfg.lora_cfg.target_experts"),
        (["policy.dtensor_cfg.lora_cfg.enabled=true", "++policy.dtensor_cfg.lora_cfg.target_experts=true",
          "policy.dtensor_cfg.tensor_parallel_size=2"], "policy.dtensor_cfg.lora_cfg.target_experts"),
    ],
)  # fmt: skip
def test_bad_lora_rank_and_dropout_fail_at_load(overrides: list[str], key: str) -> None:
    path = MEGATRON_LORA if key.startswith("policy.megatron_cfg") else QUICKSTART
    with pytest.raises(ConfigError, match=rf"^{key} is") as info:
        load_config(path, overrides)
    assert info.value.path == key


def test_data_train_names_and_weights_fail_at_load(tmp_path: Path) -> None:
    entries = "[{data_path: a.jsonl, weight: 3}, {data_path: b.jsonl}]"
    with pytest.raises(ConfigError, match=r"data.train\[1\] \(b\) has no weight but other"):
        load_config(QUICKSTART, [f"data.train={entries}"])
    with pytest.raises(ConfigError, match=r"are both named 'x'"):
        load_config(QUICKSTART, ["data.train=[{data_path: a.jsonl, name: x}, {data_path: b.jsonl, name: x}]"])  # fmt: skip


def test_save_and_validation_periods_are_checked_once_at_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    aligned = load_config(QUICKSTART, ["sft.val_period=10", "checkpointing.save_period=20"])
    assert unmeasured_saves(aligned) is None
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        cfg = load_config(QUICKSTART, ["sft.val_period=10", "checkpointing.save_period=15"])
    assert caplog.text.count("checkpointing.save_period=15 saves at other steps") == 1
    assert unmeasured_saves(cfg) is not None
    train_metric = ["sft.val_period=10", "checkpointing.save_period=15",
                    "checkpointing.metric_name=train:loss"]  # fmt: skip
    assert unmeasured_saves(load_config(QUICKSTART, train_metric)) is None


def test_token_budget_has_one_source() -> None:
    """The loader has no fallback budget of its own: a packed or dynamic plan carries the
    derived train_mb_tokens."""
    from sftkit.data.loader import BatchPlan

    with pytest.raises(ValueError, match="needs mb_tokens"):
        BatchPlan(micro_batch_size=2, mode="packed")
    cfg = load_config(QUICKSTART, ["policy.sequence_packing.enabled=true"])
    assert cfg.policy.sequence_packing.train_mb_tokens == 64 * 32
