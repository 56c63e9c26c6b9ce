"""The estimated peak memory per GPU of a run, before it starts (`--print-config` ends with it).

Parameters, gradients and optimizer state are counted exactly from the model's architecture
on the meta device with the run's LoRA and NF4 applied (tests compare them with the tensors
of a built model); FSDP2 shards them over the `dp_shard x cp x tp` ranks, padding each
tensor's first dimension to a multiple of the shard count as FSDP2 does. Activations are a
formula over the configured micro-batch tokens, per decoder layer:

    no checkpointing   layers x tokens x A       A = the tensors a Llama layer saves for
    full               layers x tokens x h x b     backward: (6h + 2q + 1.5kv + 4i) x b,
                       + tokens x A                plus its two RMSNorm inputs in float32
    selective          layers x tokens x S       S = A less the elementwise outputs (2i x b)
    offload            tokens x A (+ layer inputs in flight): the rest is in host memory

with h the hidden size, q the query width, kv the key+value width, i the MLP width, b the
compute dtype's bytes; plus the chunked loss (3 x chunk x vocab float32) and, under FSDP2,
two decoder layers' gathered weights (the one computing and the prefetched one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sftkit.model.load import DTYPES
from sftkit.model.lora import apply_lora, lora_spec_from_config
from sftkit.model.qlora import nf4_bytes, quant_spec_from_config

if TYPE_CHECKING:
    from sftkit.config.schema import MasterConfig

GiB = 2**30
ADAM_STATES = 2  # exp_avg, exp_avg_sq
STEP_BYTES = 4  # torch's Adam/AdamW keep `step` as a float32 scalar tensor per parameter


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by part; `peak` is their sum."""

    weights: int  # frozen and trainable base weights (NF4 where quantized)
    adapters: int  # LoRA A and B
    gradients: int
    optimizer: int
    activations: int
    loss: int  # the chunked head + cross-entropy's live block
    fsdp_gather: int  # gathered weights of two decoder layers (FSDP2 only)

    @property
    def peak(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def lines(self, title: str) -> list[str]:
        """YAML comment lines (the printed config still loads back)."""
        parts = [f"#   {f.name:<12} {getattr(self, f.name) / GiB:9.3f} GiB" for f in fields(self)]
        return [f"# {title}", *parts, f"#   {'peak':<12} {self.peak / GiB:9.3f} GiB"]


def _shard_bytes(shape: torch.Size, itemsize: float, shards: int) -> int:
    """One rank's bytes of a tensor FSDP2 shards on dim 0 (padded to a multiple of `shards`)."""
    if not shape:
        return math.ceil(itemsize)
    rows = math.ceil(shape[0] / shards) if shards > 1 else shape[0]
    return math.ceil(rows * math.prod(shape[1:]) * itemsize)


def _optimizer_states(cfg: MasterConfig) -> tuple[int, int]:
    """(float states per parameter element, bytes per parameter tensor) of the optimizer."""
    opt = cfg.policy.optimizer
    name = (opt.name if opt is not None else "torch.optim.AdamW").rsplit(".", 1)[-1]
    kwargs = dict(opt.kwargs) if opt is not None else {}
    if name == "SGD":
        return (1 if kwargs.get("momentum") else 0), 0
    amsgrad = bool(kwargs.get("amsgrad"))
    return ADAM_STATES + amsgrad, STEP_BYTES  # Adam-like (the estimate for unknown classes)


def _layer_sizes(config: Any) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = int(getattr(text, "intermediate_size", None) or 4 * h)
    return {"h": h, "q": heads * head_dim, "kv": 2 * kv_heads * head_dim, "i": inter,
            "layers": int(text.num_hidden_layers), "vocab": int(text.vocab_size)}  # fmt: skip


def activation_bytes(cfg: MasterConfig, config: Any) -> tuple[int, int]:
    """(activations, loss block) bytes on one GPU for the configured micro-batch."""
    p, d = cfg.policy, cfg.policy.dtensor_cfg
    s = _layer_sizes(config)
    b = DTYPES[p.precision].itemsize
    tokens = p.train_micro_batch_size * p.max_total_sequence_length
    if p.sequence_packing.enabled and p.sequence_packing.train_mb_tokens:
        tokens = int(p.sequence_packing.train_mb_tokens)
    tokens = math.ceil(tokens / d.context_parallel_size)
    tp = d.tensor_parallel_size
    h, q, kv, i = s["h"], s["q"], s["kv"], s["i"]
    norms = 2 * h * 4  # HF RMSNorm saves its input upcast to float32
    layer = (6 * h + (2 * q + 1.5 * kv + 4 * i) / tp) * b + norms
    inputs = h * b
    if d.activation_offload:
        act = layer + inputs * 2
    elif d.activation_checkpointing and d.activation_checkpointing_mode == "full":
        act = s["layers"] * inputs + layer
    elif d.activation_checkpointing:  # selective: keeps matmul and attention outputs
        act = s["layers"] * (layer - 2 * i * b / tp) + layer
    else:
        act = s["layers"] * layer
    chunk = min(p.fused_loss_chunk_size, tokens)
    loss = 3 * chunk * s["vocab"] * 4 + 2 * tokens * h * b
    return int(tokens * act), int(loss)


def estimate_memory(cfg: MasterConfig, world_size: int | None = None) -> MemoryEstimate:
    """The estimate for `cfg` on `world_size` ranks (default: the cluster's GPUs)."""
    from sftkit.model.parallel import build_meta_model

    p, d = cfg.policy, cfg.policy.dtensor_cfg
    world = world_size or cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
    shards = max(1, world // d.dp_replicate_size)  # dp_shard x cp x tp
    lora, quant = lora_spec_from_config(p), quant_spec_from_config(d.lora_cfg, p.precision)
    dense_dtype = d.bf16_params or quant is not None  # as `build_model` loads it
    param_dtype = DTYPES[p.precision] if dense_dtype else torch.float32
    model = build_meta_model(p.model_name, param_dtype=param_dtype,
                             trust_remote_code=p.trust_remote_code,
                             attn_implementation=p.attn_implementation,
                             config_overrides=dict(p.hf_config_overrides or {}),
                             check_size=False)  # fmt: skip
    quantized: set[str] = set()
    if lora is not None:
        names = apply_lora(model, lora)
        quantized = {f"{n}.weight" for n in names} if quant is not None else set()
    states, step_bytes = _optimizer_states(cfg)
    weights = adapters = grads = optim = 0
    for name, param in model.named_parameters():  # tied weights once
        item = param.element_size()
        if name in quantized and quant is not None:
            weights += math.ceil(nf4_bytes(param.numel(), name, quant) / shards)
            continue
        size = _shard_bytes(param.shape, item, shards)
        if ".lora_A." in name or ".lora_B." in name:
            adapters += size
        else:
            weights += size
        if param.requires_grad:
            grads += size
            optim += states * size + step_bytes
            if d.bf16_params and d.bf16_params_update == "kahan":
                optim += _shard_bytes(param.shape, 2, shards)
    act, loss = activation_bytes(cfg, model.config)
    gather = 0
    if world > 1:
        layer = _first_layer(model)
        compute = DTYPES[p.precision].itemsize
        gather = 2 * sum(t.numel() * compute for t in layer.parameters()) if layer else 0
    return MemoryEstimate(weights, adapters, grads, optim, act, loss, gather)


def _first_layer(model: nn.Module) -> nn.Module | None:
    from sftkit.model.load import decoder_layers

    try:
        return decoder_layers(model)[0]
    except ValueError:
        return None


def estimate_lines(cfg: MasterConfig) -> list[str]:
    """The `--print-config` trailer: the estimate as YAML comments, or why there is none."""
    world = cfg.cluster.gpus_per_node * cfg.cluster.num_nodes
    try:
        est = estimate_memory(cfg, world)
    except (ValueError, OSError) as err:  # e.g. a hub model with no network
        return [f"# estimated peak memory per GPU: not available ({str(err).splitlines()[0]})"]
    p = cfg.policy
    title = (f"estimated peak memory per GPU ({world} rank(s), micro-batch "
             f"{p.train_micro_batch_size} x {p.max_total_sequence_length} tokens):")  # fmt: skip
    return est.lines(title)
