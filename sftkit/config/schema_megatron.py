"""NeMo RL's Megatron section (`policy.megatron_cfg`) and `fp8_cfg`, typed.

sftkit runs its own engine: of these it honours `peft` (as LoRA), the optimizer's lr,
betas, eps, weight decay and clip, the scheduler's warmup and decay, and `fp8_cfg`
(`sftkit.config.compat` translates them); `IGNORED_KEYS` names the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftkit.config.keydoc import doc


@dataclass
class PeftConfig:
    """Megatron LoRA (`policy.megatron_cfg.peft`), run on sftkit's engine."""

    enabled: bool = doc(False, "train low-rank adapters")
    target_modules: list[str] = doc(factory=list, text="Megatron or HF module names")
    exclude_modules: list[str] = doc(factory=list, text="module names to skip")
    dim: int = doc(8, "rank r")
    alpha: float = doc(32, "scale = alpha / dim")
    dropout: float = doc(0.0, "dropout probability on the LoRA branch")
    dropout_position: str = doc("post", "pre | post")
    lora_A_init_method: str = doc("xavier", "xavier | uniform")
    lora_B_init_method: str = doc("zero", "zero (the only value NeMo RL uses)")
    a2a_experimental: bool = doc(False, "Megatron all-to-all communication strategy")
    lora_dtype: str | None = doc(None, 'weight dtype; the seed\'s "None" string is read as null')
    quantize_base: str | None = doc(None, "sftkit's QLoRA: see lora_cfg.quantize_base", nemo=False)
    quantize_compute_dtype: str | None = doc(
        None, "see lora_cfg.quantize_compute_dtype", nemo=False
    )
    quantize_block_size: int = doc(64, "see lora_cfg.quantize_block_size", nemo=False)
    quantize_scaler_block_size: int = doc(
        256, "see lora_cfg.quantize_scaler_block_size", nemo=False
    )


@dataclass
class MegatronCheckpointConfig:
    async_save: bool = doc(False, "Megatron: save checkpoints asynchronously")
    ckpt_assume_constant_structure: bool = doc(
        False, "Megatron: reuse the checkpoint structure between saves"
    )


@dataclass
class MegatronOptimizerConfig:
    optimizer: str = doc("adam", "AdamW when weight_decay is set")
    lr: float = doc(5.0e-6, "peak learning rate")
    min_lr: float = doc(4.9999e-6, "learning rate at the end of the decay")
    weight_decay: float = doc(0.1, "AdamW weight decay")
    bf16: bool = doc(True, "Megatron: bf16 training")
    fp16: bool = doc(False, "Megatron: fp16 training")
    params_dtype: str = doc("float32", "Megatron: parameter dtype")
    adam_beta1: float = doc(0.9, "AdamW beta1")
    adam_beta2: float = doc(0.98, "AdamW beta2")
    adam_eps: float = doc(1.0e-5, "AdamW epsilon")
    sgd_momentum: float = doc(0.9, "Megatron: SGD momentum")
    use_distributed_optimizer: bool = doc(
        True, "Megatron: shard optimizer state over data-parallel ranks"
    )
    use_precision_aware_optimizer: bool = doc(True, "Megatron: precision-aware optimizer")
    clip_grad: float | None = doc(None, "derived: policy.max_grad_norm")
    optimizer_cpu_offload: bool = doc(False, "Megatron: optimizer state on the CPU")
    optimizer_offload_fraction: float = doc(0.0, "Megatron: fraction of optimizer state offloaded")
    overlap_cpu_optimizer_d2h_h2d: bool = doc(False, "Megatron: overlap offloaded optimizer copies")


@dataclass
class MegatronSchedulerConfig:
    start_weight_decay: float | None = doc(None, "derived: megatron_cfg.optimizer.weight_decay")
    end_weight_decay: float | None = doc(None, "derived: megatron_cfg.optimizer.weight_decay")
    weight_decay_incr_style: str = doc("constant", "Megatron: weight decay schedule")
    lr_decay_style: str = doc(
        "constant", "learning-rate decay after warmup: constant | linear | cosine"
    )
    lr_decay_iters: int | None = doc(1000, "steps over which the learning rate decays")
    lr_warmup_iters: int = doc(50, "linear warmup steps")
    lr_warmup_init: float = doc(4.9999e-6, "learning rate at the start of warmup")


@dataclass
class MegatronDDPConfig:
    grad_reduce_in_fp32: bool = doc(False, "Megatron: reduce gradients in float32")
    overlap_grad_reduce: bool = doc(True, "Megatron: overlap gradient reduction with backward")
    overlap_param_gather: bool = doc(True, "Megatron: overlap parameter all-gather with forward")
    data_parallel_sharding_strategy: str = doc(
        "optim_grads_params", "Megatron FSDP sharding strategy"
    )
    use_custom_fsdp: bool = doc(False, "Megatron: its own FSDP implementation")


@dataclass
class Fp8Config:
    enabled: bool = doc(False, "FP8 GEMMs in the linear layers (sftkit: torchao float8 training)")
    fp8: str = doc("e4m3", "e4m3 everywhere | hybrid: e4m3 forward, e5m2 gradients")
    fp8_recipe: str = doc("blockwise", "scaling; sftkit: tensorwise | rowwise | rowwise_with_gw_hp")
    fp8_param: bool = doc(False, "keep parameters in FP8 (not supported by sftkit)")


@dataclass
class MegatronConfig:
    """NeMo RL's Megatron section. sftkit runs its own engine; only `peft` is honoured."""

    enabled: bool = doc(False, "accepted: sftkit trains with its own engine either way")
    checkpoint: MegatronCheckpointConfig = field(default_factory=MegatronCheckpointConfig)
    use_fused_linear_logprobs: bool = doc(False, "Megatron: fused linear + logprob kernel (RL)")
    fused_linear_logprobs_chunk_size: int = doc(
        256, "Megatron: chunk size of the fused logprob kernel"
    )
    force_reconvert_from_hf: bool = doc(False, "Megatron: convert the HF checkpoint again")
    env_vars: dict[str, Any] = doc(factory=dict, text="Megatron worker environment variables")
    empty_unused_memory_level: int = doc(1, "Megatron: how often to empty the CUDA cache")
    activation_checkpointing: bool = doc(False, "Megatron activation recomputation")
    cuda_graph_impl: str = doc("none", "Megatron: CUDA graph implementation")
    cuda_graph_modules: list[str] = doc(factory=list, text="Megatron: modules in CUDA graphs")
    cuda_graph_warmup_steps: int = doc(3, "Megatron: steps before CUDA graph capture")
    fine_grained_activation_offloading: bool = doc(
        False, "Megatron: offload activations per module"
    )
    offload_modules: list[str] | None = doc(
        None, "Megatron: modules whose activations are offloaded"
    )
    recompute_granularity: str = doc("full", "Megatron: full | selective recomputation")
    recompute_modules: list[str] | None = doc(
        None, "Megatron: modules recomputed with selective granularity"
    )
    tensor_model_parallel_size: int = doc(1, "Megatron tensor parallel degree")
    expert_tensor_parallel_size: int = doc(1, "Megatron tensor parallel degree of experts")
    expert_model_parallel_size: int = doc(1, "Megatron expert parallel degree")
    pipeline_model_parallel_size: int = doc(1, "Megatron pipeline parallel degree")
    context_parallel_size: int = doc(1, "Megatron context parallel degree")
    pipeline_dtype: str | None = doc(None, "derived: policy.precision")
    num_layers_in_first_pipeline_stage: int | None = doc(
        None, "Megatron: layers in the first pipeline stage"
    )
    num_layers_in_last_pipeline_stage: int | None = doc(
        None, "Megatron: layers in the last pipeline stage"
    )
    sequence_parallel: bool = doc(False, "Megatron sequence parallelism")
    freeze_moe_router: bool = doc(False, "Megatron: do not train MoE routers")
    moe_router_dtype: str | None = doc(None, "Megatron: MoE router dtype")
    moe_router_load_balancing_type: str = doc("aux_loss", "Megatron: MoE load-balancing loss")
    moe_router_bias_update_rate: float = doc(1.0e-3, "Megatron: MoE router bias update rate")
    moe_permute_fusion: bool = doc(True, "Megatron: fused MoE token permutation")
    apply_rope_fusion: bool = doc(True, "Megatron: fused RoPE")
    bias_activation_fusion: bool = doc(True, "Megatron: fused bias + activation")
    defer_fp32_logits: bool = doc(False, "Megatron: defer the float32 cast of logits")
    moe_per_layer_logging: bool = doc(False, "Megatron: log MoE statistics per layer")
    moe_enable_deepep: bool = doc(False, "Megatron: DeepEP MoE dispatch")
    moe_token_dispatcher_type: str = doc("alltoall", "Megatron: MoE token dispatcher")
    moe_shared_expert_overlap: bool = doc(False, "Megatron: overlap shared-expert compute")
    use_gloo_process_groups: bool = doc(False, "Megatron: also create Gloo process groups")
    gradient_accumulation_fusion: bool = doc(False, "Megatron: fused gradient accumulation")
    use_fused_weighted_squared_relu: bool = doc(False, "Megatron: fused weighted squared ReLU")
    attention_backend: str | None = doc(
        None, "Megatron attention kernel (auto, flash, unfused, ...)"
    )
    megatron_recipe: str | None = doc(
        None, "Megatron-Bridge recipe function (newer NeMo RL spelling)"
    )
    peft: PeftConfig = field(default_factory=PeftConfig)
    optimizer: MegatronOptimizerConfig = field(default_factory=MegatronOptimizerConfig)
    scheduler: MegatronSchedulerConfig = field(default_factory=MegatronSchedulerConfig)
    distributed_data_parallel_config: MegatronDDPConfig = field(default_factory=MegatronDDPConfig)
    fp8_cfg: Fp8Config = field(default_factory=Fp8Config)
