"""`build_model(cfg, env)`: the model of a run, for every world size, in one fixed order.

    1. load            HF weights on CPU (one process), or the architecture on the meta
                       device (several ranks: nothing is allocated before it is sharded)
    2. fuse weights    room for fused QKV / gate-up projections (none yet): they change
                       parameter names, so they come before anything that keys on names
    3. LoRA            before TP and FSDP, so the tensor-parallel plan splits the LoRA
                       branches with their base layers and FSDP shards them as parameters;
                       then FP8 (`fp8_cfg`) swaps the remaining nn.Linear layers for
                       torchao's Float8Linear, before TP, AC, compile and FSDP2 wrap them
    4. mesh + EP + TP  the layout's mesh (`env.dims`), experts split over "ep"
                       (`model/moe.py`), then DTensor tensor parallelism; one process:
                       moved to its device
    5. kernels         fused RMSNorm/SwiGLU/RoPE forwards and packed attention swap module
                       forwards in place: after TP (they see the sharded projections),
                       before AC and compile (which wrap those forwards) and FSDP; context
                       parallel shards attend through the packed attention too
    6. AC              activation checkpointing per decoder layer (full or selective),
                       outside the kernels, and activation offload to host memory around it
    7. compile         per decoder layer, over everything above
    8. FSDP2           last, as torchtitan does: it shards what the steps above produced;
                       experts under EP are their own units over "efsdp"; then a
                       sharded model is allocated, loaded block by block and its
                       LoRA initialised as one process would

Like torchtitan's `parallelize_llama`: one function, one order. LoRA's random init draws
from the CPU RNG in the same order on every world size, so runs on different rank counts
start from the same weights.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sftkit.config import MasterConfig
from sftkit.dist import DistEnv
from sftkit.model.attention import check_document_isolation, enable_packed_attention
from sftkit.model.dora import init_magnitudes_sharded
from sftkit.model.fp8 import apply_fp8
from sftkit.model.fused import apply_fused_kernels, compile_layers
from sftkit.model.load import DTYPES, load_model
from sftkit.model.lora import apply_lora, lora_spec_from_config
from sftkit.model.moe import apply_expert_parallel
from sftkit.model.parallel import (
    apply_activation_checkpointing,
    apply_fsdp,
    apply_tensor_parallel,
    build_meta_model,
    init_lora_sharded,
    is_lora_param,
    load_sharded_weights,
    materialize,
    tensor_parallel_plan,
    weight_files,
)
from sftkit.model.qlora import (
    build_quantized_model,
    is_quantized,
    load_quantized_weights,
    quant_spec_from_config,
)

logger = logging.getLogger("sftkit")


def _expert_parallel(model: nn.Module, ep_mesh: Any) -> None:
    ep = ep_mesh.size()
    if apply_expert_parallel(model, ep_mesh):
        logger.info("Expert parallel: %d ranks split the experts (all-to-all dispatch)", ep)
    else:
        logger.warning(
            "policy.dtensor_cfg.expert_parallel_size=%d: this model has no experts, so EP "
            "has nothing to shard; it trains with FSDP2 over all ranks", ep,
        )  # fmt: skip


def build_model(cfg: MasterConfig, env: DistEnv) -> nn.Module:
    """The policy model with every configured transform, in the order of the module doc.

    With several ranks this is collective (every rank calls); FSDP then averages gradients
    over `env.dims.gradient_divide_factor` ranks (those holding different tokens).
    """
    p, d = cfg.policy, cfg.policy.dtensor_cfg
    sharded = env.world_size > 1
    quant = quant_spec_from_config(d.lora_cfg, p.precision)
    # QLoRA trains only the float32 adapters: the dense rest of the frozen base (head,
    # embeddings, norms) stays in the run's dtype, not float32 (8B: 4.2 GB less).
    dense_dtype = d.bf16_params or quant is not None
    param_dtype = DTYPES[p.precision] if dense_dtype else torch.float32
    lora_rng = torch.get_rng_state()  # the sharded LoRA init replays one process's draws
    load_options: dict[str, Any] = {
        "param_dtype": param_dtype,
        "trust_remote_code": p.trust_remote_code,
        "attn_implementation": p.attn_implementation,
        "config_overrides": dict(p.hf_config_overrides or {}),
        "dequantize": p.dequantize_base_checkpoint,  # gpt-oss's MXFP4 experts
    }
    spec = lora_spec_from_config(p)
    # 1. load (QLoRA on one process: LoRA and NF4 while loading, `sftkit.model.qlora`)
    qlora_load = quant is not None and spec is not None and not sharded
    if qlora_load:
        assert spec is not None and quant is not None  # for the type checker
        files = weight_files(p.model_name, env)
        model, names = build_quantized_model(p.model_name, load_options, spec, quant, files,
                                             lora_rng)  # fmt: skip
    elif sharded:
        model = build_meta_model(p.model_name, **load_options)  # weights read in step 8
    else:
        model = load_model(p.model_name, **load_options, progress=env.is_main)
    # 2. fuse weights: nothing yet (fused QKV / gate-up projections would go here)
    # 3. LoRA
    if spec is not None and not qlora_load:
        names = apply_lora(model, spec)
        if quant is not None:  # several ranks: whole NF4 weights, cut by FSDP2 below
            shards = env.world_size // env.dims.dp_replicate
            load_quantized_weights(model, names, weight_files(p.model_name, env), quant,
                                   env.device, shards)  # fmt: skip
        logger.info("LoRA on %d modules (rank %d, alpha %s)", len(names), spec.dim, spec.alpha)
    if d.fp8_cfg.enabled:
        apply_fp8(model, d.fp8_cfg.fp8_recipe, d.fp8_cfg.fp8, env.device)
    # 4. mesh + tensor parallel (one process: the device)
    mesh = env.mesh  # None: one process
    if mesh is not None:
        if env.dims.ep > 1:
            _expert_parallel(model, mesh["ep"])
        if env.dims.tp > 1:
            plan = tensor_parallel_plan(model, d.custom_parallel_plan, d.sequence_parallel)
            apply_tensor_parallel(model, mesh["tp"], plan)
    else:
        if d.cpu_offload:
            logger.warning("policy.dtensor_cfg.cpu_offload is ignored with one process")
        model = model.to(env.device)
    # 5. fused kernels (CUDA only; Inductor fuses the same ops when compiling) and packed
    # attention (documents of a packed row never attend to each other)
    if env.device.type == "cuda" and d.fused_kernels and not d.compile:
        fused = apply_fused_kernels(model, device=env.device)
        logger.info("Fused kernels: %s", ", ".join(fused) or "none for this model")
    if p.sequence_packing.enabled:
        backend = enable_packed_attention(model, device=env.device)
        logger.info("Sequence packing: documents isolated by %s attention", backend)
    elif env.dims.cp > 1:  # context-parallel shards attend through sftkit_packed
        enable_packed_attention(model, device=env.device)
    # 6. activation checkpointing and offload
    if d.activation_checkpointing or d.activation_offload:
        mode = d.activation_checkpointing_mode if d.activation_checkpointing else None
        apply_activation_checkpointing(model, mode, d.activation_offload)
    if d.activation_checkpointing_mode != "full" and not d.activation_checkpointing:
        logger.warning(
            "policy.dtensor_cfg.activation_checkpointing_mode is ignored: "
            "activation_checkpointing is false"
        )
    # 7. compile
    if d.compile:
        compile_layers(model)
    if mesh is None:
        return model
    # 8. FSDP2, then allocate this rank's shards and read them from the weight files
    compute = DTYPES[p.precision]
    experts = env.dims.expert_fsdp_mesh(env.device.type) if env.dims.ep > 1 else None
    apply_fsdp(
        model,
        env.dims.fsdp_mesh(env.device.type),
        None if compute == torch.float32 else compute,
        d.cpu_offload,
        experts,
    )
    materialize(model, torch.device("cpu") if d.cpu_offload else env.device)
    files = weight_files(p.model_name, env)
    dense = {n for n, t in model.named_parameters() if not is_lora_param(n) and not is_quantized(t)}
    load_sharded_weights(model, files, dense.__contains__, progress=env.is_main)
    if spec is not None:
        init_lora_sharded(model, spec.lora_A_init, lora_rng)
        if spec.use_dora:  # m = ||W|| per row: after the base weights and B = 0
            init_magnitudes_sharded(model)
    if p.sequence_packing.enabled:  # skipped on the meta device in step 5: weights now
        check_document_isolation(model)
    return model
