"""Quantized base checkpoints: gpt-oss's MXFP4 experts, dequantized on load.

gpt-oss ships its experts in MXFP4 (transformers' layout: `<name>_blocks`, uint8 holding two
FP4 values each, [experts, rows, groups, 16]; `<name>_scales`, one power-of-two exponent + 127
per group of 32 values, [experts, rows, groups]). sftkit trains full-precision weights, so
such a checkpoint loads only with NeMo RL's `policy.dequantize_base_checkpoint: true`:

* one process: transformers' own loader with `Mxfp4Config(dequantize=True)`, which converts
  tensor by tensor as it reads them;
* several ranks (`sftkit.model.parallel.load_sharded_weights`): each rank dequantizes only
  the experts of its own block, one parameter at a time (`read_dequantized`), so host memory
  holds one parameter's block, never the model.

Without the key such a checkpoint is refused in one line; with it, an unquantized checkpoint
loads as usual and one line says the key had nothing to do. Other quantization methods are
refused: training their stored values would be silently wrong.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("sftkit")

KEY = "policy.dequantize_base_checkpoint"


def quantization_method(config: Any) -> str | None:
    """The checkpoint's `quantization_config.quant_method` (None: not quantized)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method))


def plan_dequantize(config: Any, model_name: str, dequantize: bool) -> bool:
    """Whether `config`'s checkpoint is MXFP4 to dequantize on load; refuses what sftkit
    cannot train exactly."""
    method = quantization_method(config)
    if method is None:
        if dequantize:
            logger.info("%s=true: %s is not quantized; it loads as stored", KEY, model_name)
        return False
    if method != "mxfp4":
        raise ValueError(
            f"{model_name} is quantized with {method!r}; sftkit trains full-precision weights "
            "and dequantizes only MXFP4 (gpt-oss): load an unquantized checkpoint"
        )
    if not dequantize:
        raise ValueError(
            f"{model_name} stores its experts in MXFP4; set {KEY}=true to train on their "
            "dequantized weights (NeMo RL's gpt-oss recipes do)"
        )
    return True


def drop_quantization(config: Any) -> None:
    """Build full-precision experts from `config`, and export a config that says so."""
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def from_pretrained_options() -> dict[str, Any]:
    """The `from_pretrained` keyword that makes transformers dequantize MXFP4 as it loads."""
    from transformers.utils.quantization_config import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 `blocks` [E, rows, G, 16] and `scales` [E, rows, G] as the [E, G*32, rows]
    weight transformers' experts hold (transformers' own conversion, exact)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def read_dequantized(
    where: dict[str, Any], key: str, index: tuple[slice, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """This rank's block `index` of parameter `key` from its MXFP4 `<key>_blocks`/`_scales`
    in the open safetensors handles `where`; None when the checkpoint has no such pair.

    Only the experts of `index[0]` are read and converted (expert parallelism and FSDP2
    shard the expert dimension); the other dimensions are sliced after conversion."""
    blocks_key, scales_key = f"{key}_blocks", f"{key}_scales"
    if blocks_key not in where or scales_key not in where:
        return None
    experts = index[0]
    blocks = where[blocks_key].get_slice(blocks_key)[experts]
    scales = where[scales_key].get_slice(scales_key)[experts]
    rest = (slice(None),) + tuple(index[1:])
    return dequantize(blocks, scales, dtype)[rest]
