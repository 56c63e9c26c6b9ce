"""Every derived config value, filled once right after the config is loaded.

A key left null (or unset) gets the value NeMo RL writes as an interpolation, so the rest of
sftkit reads one effective value and never falls back on a default of its own; the filled
values are what `--print-config` prints and what the resume fingerprint keys on.

| key | derived from |
| --- | --- |
| `DERIVED_DEFAULTS` (`data.max_input_seq_length`, `policy.tokenizer.name`, ...) | the key it names (`policy.max_total_sequence_length`, ...) |
| `policy.dynamic_batching.train_mb_tokens`, `policy.sequence_packing.train_mb_tokens` | `max_total_sequence_length * train_micro_batch_size` |
| `data.max_row_chars` | `max(1,000,000, 8 * data.max_input_seq_length)` |
| `policy.tokenizer.chat_template` | `custom_template` when set (the seed guide's spelling) |
| `policy.dtensor_cfg.lora_cfg` | the LoRA that trains: Megatron's `peft` translated into it (`compat.megatron_peft`), `use_triton` off under tensor parallelism, `quantize_compute_dtype` (null: `policy.precision`) |

Order: defaults first (the Megatron translation reads `clip_grad` and the weight decays
derived here), then `compat.translate`, then the effective LoRA (after the layout is final).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sftkit.config.checks import check_config
from sftkit.config.compat import translate
from sftkit.config.schema import DERIVED_DEFAULTS, TOKEN_BUDGET_KEYS, MasterConfig

logger = logging.getLogger("sftkit")

# data.max_row_chars when null: at least this, and 8 characters per token of the limit (a
# token is rarely longer than 8 characters, so no row that could fit is dropped).
MIN_MAX_ROW_CHARS = 1_000_000
CHARS_PER_TOKEN_BOUND = 8


def derive(cfg: DictConfig) -> None:
    """Fill every derived value of a resolved config in place (see the module table)."""
    fill_defaults(cfg)
    translate(cfg)
    effective_lora(cfg)


def derive_config(cfg: MasterConfig) -> MasterConfig:
    """A config built in code, derived and checked as `load_config` does for a file."""
    tree = OmegaConf.structured(cfg)
    derive(tree)
    obj = OmegaConf.to_object(tree)
    assert isinstance(obj, MasterConfig)
    check_config(obj)
    return obj


def fill_defaults(cfg: DictConfig) -> None:
    """The `None` defaults NeMo RL writes as interpolations, the token budgets, the row cap,
    the `custom_template` alias and Megatron's `lora_dtype: None` string read as null."""
    for path, source_path in DERIVED_DEFAULTS.items():
        if OmegaConf.select(cfg, path) is None:
            OmegaConf.update(cfg, path, OmegaConf.select(cfg, source_path))
    budget = cfg.policy.max_total_sequence_length * cfg.policy.train_micro_batch_size
    for path in TOKEN_BUDGET_KEYS:
        if OmegaConf.select(cfg, path) is None:
            OmegaConf.update(cfg, path, budget)
    data = cfg.data
    if data.max_row_chars is None:
        limit = int(data.max_input_seq_length)
        data.max_row_chars = max(MIN_MAX_ROW_CHARS, CHARS_PER_TOKEN_BOUND * limit)
    if cfg.policy.megatron_cfg.peft.lora_dtype in ("None", "none"):
        cfg.policy.megatron_cfg.peft.lora_dtype = None
    tokenizer = cfg.policy.tokenizer
    if tokenizer.custom_template is not None:
        if tokenizer.chat_template not in ("default", None, tokenizer.custom_template):
            logger.warning(
                "policy.tokenizer.custom_template and policy.tokenizer.chat_template are both "
                "set and differ; using custom_template. Set only one of them."
            )
        tokenizer.chat_template = tokenizer.custom_template


def effective_lora(cfg: Any) -> None:
    """`lora_cfg.use_triton` is off under tensor parallelism: the fused kernels assume whole
    (unsharded) A and B (NeMo RL asserts instead)."""
    lora, d = cfg.policy.dtensor_cfg.lora_cfg, cfg.policy.dtensor_cfg
    if lora.enabled and lora.use_triton and d.tensor_parallel_size > 1:
        logger.warning(
            "policy.dtensor_cfg.lora_cfg.use_triton is ignored because tensor_parallel_size "
            "> 1; the PyTorch LoRA path is used."
        )
        lora.use_triton = False
    if lora.quantize_base is not None and lora.quantize_compute_dtype is None:
        lora.quantize_compute_dtype = cfg.policy.precision  # NF4 dequantizes to the run's dtype
