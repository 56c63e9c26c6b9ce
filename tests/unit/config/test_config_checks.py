"""Cross-field checks: each rule fails with a sentence saying how to fix it."""

from __future__ import annotations

import pytest
from nemo_fixture_paths import NEMO_BASE

from sftkit.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["policy.train_global_batch_size=33", "policy.train_micro_batch_size=2"],
            r"train_global_batch_size \(33\) must be a multiple of .*micro_batch_size \(2\): "
            r"set it to 32 or 34",
        ),
        (["policy.train_micro_batch_size=0"], "must be >= 1"),
        (["checkpointing.metric_name=eval:val_loss"], "must start with 'val:' or 'train:'"),
        (["checkpointing.checkpoint_must_save_by=1:00:00"], "DD:HH:MM:SS"),
        (["checkpointing.checkpoint_must_save_by=3600"], "DD:HH:MM:SS in quotes"),
        (["policy.precision=fp16"], "policy.precision is 'fp16'; choose one of 'float32'"),
        (
            ["policy.sequence_packing.enabled=true", "policy.dynamic_batching.enabled=true"],
            "mutually exclusive",
        ),
        (["data.overlong_policy=skip"], "data.overlong_policy is 'skip'; choose one of"),
        (["policy.dtensor_cfg.lora_cfg.dropout_position=mid"], "dropout_position is 'mid'"),
        (["policy.dtensor_cfg.lora_cfg.lora_A_init=normal"], "lora_A_init is 'normal'"),
        (["policy.megatron_cfg.peft.dropout_position=x"], "peft.dropout_position is 'x'"),
        (["policy.dtensor_cfg.lora_cfg.quantize_base=nf4"], "quantize_base='nf4': LoRA is off"),
        (["policy.dtensor_cfg.lora_cfg.quantize_base=int4"], "quantize_base is 'int4'; choose"),
        (
            [
                f"policy.dtensor_cfg.lora_cfg.{k}"
                for k in ("quantize_block_size=63", "quantize_base=nf4", "enabled=true")
            ],  # fmt: skip
            "quantize_block_size is 63; NF4 packs two weights a byte",
        ),
        (
            [
                "policy.dtensor_cfg.lora_cfg.quantize_base=nf4",
                "policy.dtensor_cfg.lora_cfg.enabled=true",
                "policy.dtensor_cfg.fp8_cfg.enabled=true",
            ],  # fmt: skip
            "is not supported with fp8_cfg.enabled",
        ),
        (["policy.sequence_packing.algorithm=best_fit"], "sequence_packing.algorithm"),
        (["data.train=abc"], "data.train is 'abc'; it must be a dataset config"),
        (["data.validation=[{data_path: a}, 3]"], "data.validation is .*a list of them"),
    ],
)
def test_cross_field_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as err:
        load_config(NEMO_BASE, overrides)
    assert f"override '{overrides[0]}'" in str(err.value)  # where the bad value came from


def test_valid_values_pass() -> None:
    cfg = load_config(
        NEMO_BASE,
        [
            "policy.train_global_batch_size=64",
            "policy.train_micro_batch_size=4",
            "checkpointing.metric_name=train:loss",
            "checkpointing.checkpoint_must_save_by='00:03:30:00'",
            "policy.precision=float32",
            "policy.sequence_packing.enabled=true",
            "data.overlong_policy=drop",
            "policy.dtensor_cfg.lora_cfg.dropout_position=pre",
            "policy.dtensor_cfg.lora_cfg.lora_A_init=uniform",
            "data.validation=[{data_path: a.jsonl}, {data_path: b.jsonl}]",
            "logger.wandb.name=x",  # NeMo's name interpolates data.train, unaffected here
        ],
    )
    assert cfg.checkpointing.checkpoint_must_save_by == "00:03:30:00"
    assert cfg.checkpointing.metric_name == "train:loss"
    assert isinstance(cfg.data.validation, list) and len(cfg.data.validation) == 2
    assert (
        load_config(NEMO_BASE, ["checkpointing.metric_name=null"]).checkpointing.metric_name is None
    )


def test_all_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(NEMO_BASE, ["policy.precision=fp8", "data.overlong_policy=skip"])
    message = str(err.value)
    assert "policy.precision" in message and "data.overlong_policy" in message
    assert err.value.path == "policy.precision"


def test_error_from_a_file_names_the_file(write_yaml) -> None:
    path = write_yaml("bad.yaml", "policy: {precision: fp32}\n")
    with pytest.raises(ConfigError, match=r"choose one of .*\(set in .*bad.yaml\)"):
        load_config(path)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        load_config(NEMO_BASE, ["policy.precision=fp8"])
