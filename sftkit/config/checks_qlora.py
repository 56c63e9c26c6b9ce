"""Checks of the QLoRA keys (`lora_cfg.quantize_*`), kept beside `checks.py` for its size."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftkit.config.schema import MasterConfig


def qlora_problems(cfg: MasterConfig) -> list[tuple[str, str]]:
    """`quantize_base` (QLoRA) needs LoRA, whole linear layers and no FP8: NF4 weights are
    frozen, and neither torchao's Float8Linear nor the DTensor TP plan take an NF4 weight."""
    d, meg = cfg.policy.dtensor_cfg, cfg.policy.megatron_cfg.enabled
    lora = d.lora_cfg
    if lora.quantize_base is None:
        return []
    section = "policy.megatron_cfg.peft" if meg else "policy.dtensor_cfg.lora_cfg"
    key = f"{section}.quantize_base"
    why = {
        "LoRA is off (quantize only frozen base weights): set lora_cfg.enabled=true or "
        "quantize_base=null": not lora.enabled,
        "is not supported with tensor_parallel_size > 1 (an NF4 weight cannot be split by the "
        "TP plan): set one of them to 1 / null": d.tensor_parallel_size > 1,
        "is not supported with fp8_cfg.enabled (both replace the base linear weights): "
        "disable one": d.fp8_cfg.enabled,
    }
    problems = [(key, f"{key}={lora.quantize_base!r}: {text}.") for text, bad in why.items() if bad]
    block = lora.quantize_block_size
    if not isinstance(block, bool) and isinstance(block, int) and block % 2:
        problems.append((f"{section}.quantize_block_size", f"{section}.quantize_block_size is "
                         f"{block}; NF4 packs two weights a byte, so use an even size, e.g. 64."))  # fmt: skip
    return problems
