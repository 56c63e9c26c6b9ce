"""Numeric ranges: an absurd value fails at load with one line naming the key; NeMo RL's
sentinels (-1/0 periods, val_batches <= 0, null) still load."""

from __future__ import annotations

import pytest
from nemo_fixture_paths import NEMO_BASE

from sftkit.config import ConfigError, load_config
from sftkit.config.ranges import RANGES

ABSURD = [
    ("policy.max_grad_norm", "-1"),  # flipped every gradient, exit 0
    ("policy.max_grad_norm", "nan"),
    ("sft.max_num_steps", "-3"),  # untrained final_hf, exit 0
    ("sft.max_num_steps", "0"),
    ("sft.max_num_epochs", "-1"),
    ("sft.max_num_epochs", "0"),
    ("sft.val_global_batch_size", "0"),  # range() arg 3 must not be zero after model load
    ("sft.val_global_batch_size", "-8"),
    ("sft.val_micro_batch_size", "0"),
    ("sft.val_period", "-7"),
    ("sft.val_batches", "-2"),
    ("sft.seed", "-1"),
    ("sft.seed", "4294967296"),
    ("checkpointing.keep_top_k", "0"),
    ("checkpointing.keep_top_k", "-1"),
    ("checkpointing.save_period", "-5"),
    ("checkpointing.ft_save_period", "-1"),
    ("checkpointing.ft_keep_latest_k", "-2"),
    ("policy.max_total_sequence_length", "0"),
    ("policy.max_total_sequence_length", "1000000000"),
    ("policy.make_sequence_length_divisible_by", "0"),
    ("policy.fused_loss_chunk_size", "0"),
    ("policy.dtensor_cfg.tensor_parallel_size", "0"),
    ("policy.dtensor_cfg.context_parallel_size", "-2"),
    ("policy.dtensor_cfg.dp_replicate_size", "0"),
    ("policy.dtensor_cfg.lora_cfg.dim", "0"),
    ("policy.dtensor_cfg.lora_cfg.alpha", "-32"),
    ("policy.dtensor_cfg.lora_cfg.dropout", "1.5"),
    ("policy.megatron_cfg.peft.dim", "-8"),
    ("policy.dynamic_batching.sequence_length_round", "0"),
    ("policy.sequence_packing.train_mb_tokens", "-1"),
    ("policy.optimizer.kwargs.lr", "-1e-5"),
    ("policy.optimizer.kwargs.lr", "inf"),
    ("policy.optimizer.kwargs.weight_decay", "-0.1"),
    ("policy.optimizer.kwargs.eps", "0"),
    ("policy.optimizer.kwargs.betas", "[1.5,0.98]"),
    ("policy.optimizer.kwargs.betas", "[0.9,-0.98]"),
    ("policy.megatron_cfg.optimizer.lr", "-2e-5"),
    ("policy.megatron_cfg.optimizer.adam_beta2", "1.0"),
    ("policy.megatron_cfg.scheduler.lr_warmup_iters", "-50"),
    ("data.max_input_seq_length", "-1"),
    ("data.num_workers", "-1"),
    ("data.max_row_chars", "0"),
    ("logger.num_val_samples_to_print", "-3"),
    ("logger.val_sample_max_new_tokens", "0"),
    ("logger.gpu_monitoring.collection_interval", "0"),
    ("cluster.gpus_per_node", "0"),
    ("cluster.num_nodes", "-1"),
    ("cluster.collective_timeout_s", "0"),
]


@pytest.mark.parametrize(("key", "value"), ABSURD)
def test_absurd_value_fails_at_load_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(NEMO_BASE, [f"{key}={value}"])
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(key), message  # betas.0 / betas.1 start with the list's key
    assert "; it must be" in message or "use a finite value" in message  # lr=inf: checks.py


@pytest.mark.parametrize(
    "overrides",
    [
        ["sft.val_period=-1"],
        ["sft.val_period=0"],
        ["sft.val_batches=-1"],
        ["sft.val_batches=0"],
        ["checkpointing.save_period=0"],
        ["checkpointing.keep_top_k=null"],
        ["checkpointing.ft_save_period=null"],
        ["policy.max_grad_norm=null"],
        ["policy.max_grad_norm=0"],
        ["data.num_workers=0"],
        ["sft.seed=0"],
    ],
)
def test_nemo_rl_sentinels_still_load(overrides: list[str]) -> None:
    load_config(NEMO_BASE, overrides)


def test_every_range_path_is_tried() -> None:
    tried = {key for key, _ in ABSURD}
    untried = {path.rsplit(".", 1)[0] if path[-1].isdigit() else path for path in RANGES}
    assert len(ABSURD) >= 30
    assert len(untried - tried) <= len(RANGES) // 3  # most keys have an absurd value here
