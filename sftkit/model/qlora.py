"""QLoRA: the frozen base of LoRA-adapted linear layers stored as 4-bit NF4 (torchao).

`lora_cfg.quantize_base: nf4` turns it on. Each adapted layer's weight becomes a frozen
`nn.Parameter` holding torchao's `NF4Tensor` (QLoRA's NormalFloat4 with double-quantized
scales: one int8 scale per `quantize_block_size` weights, one scale of scales per
`quantize_scaler_block_size` of them), as torchtune's QLoRA stores it. The LoRA forward
(`sftkit.model.lora`) dequantizes it to `quantize_compute_dtype` for each matmul and keeps
only the NF4 tensor for backward; FSDP2 all-gathers the NF4 bytes (torchao's FSDP hooks).
The head, the embeddings, norms and layers LoRA leaves out stay dense.

Weights are quantized while they are read, one tensor at a time from the safetensors files,
so the dense model never sits in memory: peak host memory is the quantized model plus one
dense weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from sftkit.model.load import DTYPES
from sftkit.model.lora import LoraSpec, apply_lora

logger = logging.getLogger("sftkit")

NF4_LEVELS = 16  # the NF4 lookup table each NF4Tensor carries


@dataclass(frozen=True)
class QuantSpec:
    """How the base is quantized (`lora_cfg.quantize_*`, checked at config load)."""

    compute_dtype: torch.dtype = torch.bfloat16  # what NF4 dequantizes to
    block_size: int = 64  # weights per scale
    scaler_block_size: int = 256  # scales per double-quantization block, at most


def quant_spec_from_config(lora_cfg: Any, precision: str) -> QuantSpec | None:
    """The `QuantSpec` of `policy.dtensor_cfg.lora_cfg`, None when the base stays dense."""
    if not lora_cfg.enabled or lora_cfg.quantize_base is None:
        return None
    return QuantSpec(
        compute_dtype=DTYPES[lora_cfg.quantize_compute_dtype or precision],
        block_size=int(lora_cfg.quantize_block_size),
        scaler_block_size=int(lora_cfg.quantize_scaler_block_size),
    )


def block_sizes(name: str, numel: int, spec: QuantSpec, shards: int = 1) -> tuple[int, int]:
    """(block size, scaler block size) for a weight of `numel` values: the scaler block is
    the largest divisor of the block count (per FSDP shard) up to `spec.scaler_block_size`
    (torchao needs exact divisions; 256 does not divide a 352 x 128 weight's 704 blocks)."""
    if numel % (spec.block_size * shards):
        raise ValueError(
            f"{name}: {numel} weights are not a multiple of lora_cfg.quantize_block_size="
            f"{spec.block_size} x {shards} FSDP shard(s); pick a size that divides the "
            "model's linear weights (64 divides most), or exclude this layer from LoRA"
        )
    n_blocks = numel // spec.block_size // shards
    scaler = max(
        d for d in range(1, min(spec.scaler_block_size, n_blocks) + 1) if n_blocks % d == 0
    )
    return spec.block_size, scaler


def quantize(name: str, weight: Tensor, spec: QuantSpec, shards: int = 1) -> Tensor:
    """`weight` as a frozen NF4 tensor that dequantizes to `spec.compute_dtype`; with
    `shards`, FSDP2 can cut it into that many equal row blocks (torchao's split)."""
    try:
        from torchao.quantization import to_nf4
    except ImportError as err:
        raise ValueError(
            "policy.dtensor_cfg.lora_cfg.quantize_base=nf4 needs torchao: `pip install torchao` "
            f"(or `pip install sftkit[fp8]`), or set quantize_base=null ({err})"
        ) from err
    if weight.shape[0] % shards:
        raise ValueError(
            f"{name}: {weight.shape[0]} rows do not split over {shards} FSDP ranks; an NF4 "
            "weight is sharded without padding: use a rank count that divides it"
        )
    block, scaler = block_sizes(name, weight.numel(), spec, shards)
    return to_nf4(weight.to(spec.compute_dtype).contiguous(), block, scaler)


def nf4_bytes(numel: int, name: str, spec: QuantSpec) -> int:
    """Bytes of one NF4 weight, as torchao stores it: 4 bits a weight, one int8 scale a
    block, and per scaler block one factor, plus the mean and the 16-value table in the
    compute dtype."""
    block, scaler = block_sizes(name, numel, spec)
    n_blocks = numel // block
    itemsize = torch.empty(0, dtype=spec.compute_dtype).element_size()
    return numel // 2 + n_blocks + (n_blocks // scaler + 1 + NF4_LEVELS) * itemsize


def is_quantized(t: Tensor) -> bool:
    """An NF4 tensor (local, or the local part of a DTensor shard)."""
    local = getattr(t, "_local_tensor", t)
    return type(local).__name__ == "NF4Tensor"


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds: the inner tensors of an NF4 tensor, else numel x itemsize."""
    local: Any = getattr(t, "_local_tensor", t)
    if is_quantized(local):
        inner, _ = local.__tensor_flatten__()
        return sum(getattr(local, a).numel() * getattr(local, a).element_size() for a in inner)
    return local.numel() * local.element_size()


# ----------------------------------------------------------------------------- loading


def _readers(files: list[Path]) -> dict[str, Any]:
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    return {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (not a dict)


def take_base_weights(model: nn.Module, names: list[str]) -> None:
    """Drop the (meta) weights of `names` so `materialize` does not allocate them dense."""
    for name in names:
        module = model.get_submodule(name)
        del module._parameters["weight"]
        module.register_parameter("weight", None)


@torch.no_grad()
def load_quantized_weights(
    model: nn.Module,
    names: list[str],
    files: list[Path],
    spec: QuantSpec,
    device: torch.device | None = None,
    shards: int = 1,
) -> None:
    """Read each of `names`' weights from `files`, one at a time, quantize it (on `device`)
    and set it as the layer's frozen weight; FSDP2 later keeps this rank's `1/shards`."""
    where = _readers(files)
    for name in names:
        key = f"{name}.weight"
        if key not in where:
            raise ValueError(
                f"{files[0].parent} has no {key}; is it a checkpoint of this model "
                "(policy.model_name)?"
            )
        nf4 = quantize(name, where[key].get_tensor(key).to(device), spec, shards)
        model.get_submodule(name).weight = nn.Parameter(nf4, requires_grad=False)


def build_quantized_model(
    model_name: str, load_options: dict[str, Any], lora: LoraSpec, spec: QuantSpec,
    files: list[Path], lora_rng: Tensor,
) -> tuple[nn.Module, list[str]]:  # fmt: skip
    """One process: the architecture on meta, LoRA, then the dense parameters loaded and the
    adapted layers' weights quantized one by one; LoRA initialised as `apply_lora` would."""
    from sftkit.model.parallel import (
        build_meta_model,
        init_lora_sharded,
        is_lora_param,
        load_sharded_weights,
        materialize,
    )

    model = build_meta_model(model_name, **load_options)
    names = apply_lora(model, lora)
    take_base_weights(model, names)
    materialize(model, torch.device("cpu"))
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # to_empty gave the tied head its own (empty) tensor: share it again
        tie()
    quantized = {f"{n}.weight" for n in names}
    load_sharded_weights(model, files, lambda n: not is_lora_param(n) and n not in quantized)
    load_quantized_weights(model, names, files, spec)
    init_lora_sharded(model, lora.lora_A_init, lora_rng)
    if lora.use_dora:  # m = ||W + s B A|| per row of the NF4 base (B = 0: the base's norm)
        from sftkit.model.dora import init_magnitudes_sharded

        init_magnitudes_sharded(model)
    log_savings(model, names)
    return model, names


def log_savings(model: nn.Module, names: list[str]) -> None:
    """One line: the quantized layers' bytes against their dense bf16 bytes."""
    weights = [cast(Tensor, model.get_submodule(n).weight) for n in names]
    nf4 = sum(tensor_bytes(w) for w in weights)
    bf16 = sum(2 * w.numel() for w in weights)
    logger.info("QLoRA: %d linear layers in NF4, %.1f MB (%.2fx their bf16 %.1f MB)",
                len(names), nf4 / 1e6, nf4 / max(bf16, 1), bf16 / 1e6)  # fmt: skip


@torch.no_grad()
def dequantize_base(model: nn.Module) -> None:
    """In place: every NF4 weight back to a dense one of its compute dtype (for merging
    and export; the merged weights carry the NF4 rounding of the base, see the README)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and is_quantized(weight):
            module.weight = nn.Parameter(weight.to(weight.dtype), requires_grad=False)
