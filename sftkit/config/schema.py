"""The typed config: NeMo RL's SFT key tree with NeMo RL's documented defaults.

Every section is a dataclass; `sftkit.config.load` merges user YAML into it, so unknown
keys and wrong types are rejected when the config is loaded. A `None` default marked
"derived" is filled at load time with the value NeMo RL writes as an interpolation
(`policy.tokenizer.name: ${policy.model_name}`), see `DERIVED_DEFAULTS`. Keys that NeMo RL
defines but sftkit does not act on are listed in `IGNORED_KEYS` and reported in one
warning when set to a non-default value. Choice-valued fields are plain `str` (OmegaConf
cannot type `Literal`); their allowed values are in `CHOICES` and checked at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The SQuAD "Context/Question/Answer" template of NeMo RL's examples/configs/sft.yaml.
SQUAD_CHAT_TEMPLATE = (
    "{% for message in messages %}{%- if message['role'] == 'system'  %}"
    "{{'Context: ' + message['content'].strip()}}"
    "{%- elif message['role'] == 'user'  %}"
    "{{' Question: ' + message['content'].strip() + ' Answer:'}}"
    "{%- elif message['role'] == 'assistant'  %}"
    "{{' ' + message['content'].strip()}}{%- endif %}{% endfor %}"
)


@dataclass
class SFTConfig:
    max_num_epochs: int = 1  # stop after this many passes over the training data
    max_num_steps: int = 60  # stop after this many optimizer steps
    val_period: int = 10  # validate every N steps; <= 0 disables periodic validation
    val_batches: int = 8  # validation batches per validation; <= 0 means the whole set
    val_global_batch_size: int = 32  # examples per validation batch
    val_micro_batch_size: int = 1  # examples per validation forward pass
    val_at_start: bool = True  # validate before the first step (fresh runs only)
    val_at_end: bool = False  # validate after the last step
    seed: int = 42  # seeds Python, NumPy and torch (and the data order)
    only_unmask_final: bool = False  # train only the final assistant turn


@dataclass
class PretrainedCheckpointConfig:
    path: str | None = None  # Megatron checkpoint to start from (not supported by sftkit)
    format: str = "megatron_bridge"  # megatron_bridge | megatron_lm


@dataclass
class CheckpointingConfig:
    enabled: bool = True  # write checkpoints and resume from them
    checkpoint_dir: str = "results/sft"  # where step_N/ and final_hf/ are written
    metric_name: str | None = "val:val_loss"  # ranks checkpoints: val:<name> or train:<name>
    higher_is_better: bool = False  # direction of metric_name
    keep_top_k: int | None = 3  # best checkpoints kept (the latest is always kept); null: all
    save_period: int = 10  # save every N steps (and at the end)
    checkpoint_must_save_by: str | None = None  # "DD:HH:MM:SS" budget: save and stop before it
    save_optimizer: bool = True  # include optimizer and scheduler state
    model_save_format: str = "safetensors"  # weights format inside checkpoints
    save_consolidated: bool = False  # also write an HF-loadable directory at each save
    is_async: bool = False  # NeMo RL asynchronous finalisation (saves are synchronous here)
    ft_save_period: int | None = None  # extra "fault tolerance" save period in steps
    ft_keep_latest_k: int | None = None  # always keep the latest k checkpoints
    resume: bool = True  # sftkit: resume from the latest complete checkpoint in checkpoint_dir
    resume_mismatch: str = "error"  # sftkit: error | fresh, when settings differ from the saved
    take_over_lock: bool = False  # sftkit: take another run's lock on checkpoint_dir (it is dead)
    pretrained_checkpoint: PretrainedCheckpointConfig = field(
        default_factory=PretrainedCheckpointConfig
    )


@dataclass
class TokenizerConfig:
    name: str | None = None  # HF id or local directory; derived: policy.model_name
    chat_template: str | None = "default"  # "default" | null (passthrough) | Jinja | path.jinja
    custom_template: str | None = None  # seed guide's spelling; if set, loaded as chat_template
    chat_template_kwargs: dict[str, Any] | None = None  # template variables: enable_thinking
    is_tokenizer_processor: bool = False  # NeMo RL VLM: load an AutoProcessor (text-only here)


@dataclass
class LoraConfig:
    enabled: bool = False  # train low-rank adapters instead of all weights
    target_modules: list[str] = field(default_factory=list)  # module names or wildcards to adapt
    exclude_modules: list[str] = field(default_factory=list)  # module names or wildcards to skip
    match_all_linear: bool = True  # adapt every linear layer (overrides target_modules)
    dim: int = 8  # rank r
    alpha: float = 32  # scale = alpha / dim
    dropout: float = 0.0  # dropout probability on the LoRA branch, in [0, 1)
    dropout_position: str = "post"  # pre: on the LoRA input | post: on the LoRA output
    lora_A_init: str = "xavier"  # xavier (normal) | uniform (kaiming)
    use_triton: bool = True  # fused Triton kernels on GPU when tensor parallelism is off
    # sftkit: adapter weight dtype; float32 as NeMo RL forces (FSDP needs one dtype per
    # group); Megatron's peft.lora_dtype is translated into it
    lora_dtype: str = "float32"


@dataclass
class DTensorConfig:
    _v2: bool = True  # NeMo RL DTensor worker version (both map to sftkit's engine)
    enabled: bool = True  # use the DTensor/FSDP2 engine
    env_vars: dict[str, Any] = field(default_factory=dict)  # environment for the workers
    cpu_offload: bool = False  # FSDP2 CPU offload of parameters and gradients
    sequence_parallel: bool = False  # shard activations along the sequence in TP regions
    activation_checkpointing: bool = False  # recompute decoder layers in backward
    # sftkit: full (keep each layer's input only) | selective (also keep matmul and attention
    # outputs, recompute the elementwise rest: less recompute, more memory); with the above
    activation_checkpointing_mode: str = "full"
    # sftkit: keep saved activations in pinned host memory (torch save_on_cpu), per decoder
    # layer; with activation_checkpointing only the layer inputs go: the long-context setting
    activation_offload: bool = False
    tensor_parallel_size: int = 1  # tensor parallel degree
    context_parallel_size: int = 1  # ranks each sequence is split over (context parallel)
    dp_replicate_size: int = 1  # HSDP: FSDP2 shards within world/(R x TP) ranks, replicates R times
    expert_parallel_size: int = 1  # MoE expert parallel degree (experts are FSDP2-sharded)
    custom_parallel_plan: str | None = None  # dotted path to a TP plan
    automodel_kwargs: dict[str, Any] = field(default_factory=dict)  # NeMo Automodel options
    lora_cfg: LoraConfig = field(default_factory=LoraConfig)
    bf16_params: bool = False  # sftkit: keep parameters in bf16 (less memory, no fp32 master)
    # sftkit: how AdamW writes float32 updates into bf16 parameters: none (torch's optimizer,
    # round to nearest: small updates are lost) | stochastic_rounding | kahan (+2 B/param)
    bf16_params_update: str = "none"
    # sftkit: FP8 linear layers through torchao (NeMo RL's fp8_cfg spelling; see Fp8Config)
    fp8_cfg: Fp8Config = field(
        default_factory=lambda: Fp8Config(fp8="hybrid", fp8_recipe="tensorwise")
    )
    compile: bool = False  # sftkit: torch.compile each decoder layer
    fused_kernels: bool = (
        True  # sftkit: fused RMSNorm/SwiGLU/RoPE kernels on CUDA (Liger if installed)
    )


@dataclass
class DynamicBatchingConfig:
    enabled: bool = False  # form micro-batches by a token budget instead of a count
    train_mb_tokens: int | None = None  # tokens per micro-batch; derived: seq len * micro bs
    sequence_length_round: int = 64  # round lengths up to a multiple of this
    logprob_mb_tokens: int | None = None  # RL-only: token budget of the logprob pass


@dataclass
class SequencePackingConfig(DynamicBatchingConfig):
    algorithm: str = "modified_first_fit_decreasing"  # bin packing algorithm, see CHOICES
    microbatch_order: str = "packer"  # packer | largest_first


@dataclass
class OptimizerConfig:
    name: str = "torch.optim.AdamW"  # dotted path of the optimizer class
    kwargs: dict[str, Any] = field(
        default_factory=lambda: {
            "lr": 5.0e-6,
            "weight_decay": 0.1,
            "betas": [0.9, 0.98],
            "eps": 1.0e-5,
            "foreach": False,
            "fused": False,
        }
    )


@dataclass
class PeftConfig:
    """Megatron LoRA (`policy.megatron_cfg.peft`), run on sftkit's engine."""

    enabled: bool = False  # train low-rank adapters
    target_modules: list[str] = field(default_factory=list)  # Megatron or HF module names
    exclude_modules: list[str] = field(default_factory=list)  # module names to skip
    dim: int = 8  # rank r
    alpha: float = 32  # scale = alpha / dim
    dropout: float = 0.0  # dropout probability on the LoRA branch
    dropout_position: str = "post"  # pre | post
    lora_A_init_method: str = "xavier"  # xavier | uniform
    lora_B_init_method: str = "zero"  # zero (the only value NeMo RL uses)
    a2a_experimental: bool = False  # Megatron all-to-all communication strategy
    lora_dtype: str | None = None  # weight dtype; the seed's "None" string is read as null


@dataclass
class MegatronCheckpointConfig:
    async_save: bool = False
    ckpt_assume_constant_structure: bool = False


@dataclass
class MegatronOptimizerConfig:
    optimizer: str = "adam"  # AdamW when weight_decay is set
    lr: float = 5.0e-6
    min_lr: float = 4.9999e-6
    weight_decay: float = 0.1
    bf16: bool = True
    fp16: bool = False
    params_dtype: str = "float32"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1.0e-5
    sgd_momentum: float = 0.9
    use_distributed_optimizer: bool = True
    use_precision_aware_optimizer: bool = True
    clip_grad: float | None = None  # derived: policy.max_grad_norm
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 0.0
    overlap_cpu_optimizer_d2h_h2d: bool = False


@dataclass
class MegatronSchedulerConfig:
    start_weight_decay: float | None = None  # derived: megatron_cfg.optimizer.weight_decay
    end_weight_decay: float | None = None  # derived: megatron_cfg.optimizer.weight_decay
    weight_decay_incr_style: str = "constant"
    lr_decay_style: str = "constant"
    lr_decay_iters: int | None = 1000
    lr_warmup_iters: int = 50
    lr_warmup_init: float = 4.9999e-6


@dataclass
class MegatronDDPConfig:
    grad_reduce_in_fp32: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    data_parallel_sharding_strategy: str = "optim_grads_params"
    use_custom_fsdp: bool = False


@dataclass
class Fp8Config:
    enabled: bool = False  # FP8 GEMMs in the linear layers (sftkit: torchao float8 training)
    fp8: str = "e4m3"  # e4m3 everywhere | hybrid: e4m3 forward, e5m2 gradients
    fp8_recipe: str = "blockwise"  # scaling; sftkit: tensorwise | rowwise | rowwise_with_gw_hp
    fp8_param: bool = False  # keep parameters in FP8 (not supported by sftkit)


@dataclass
class MegatronConfig:
    """NeMo RL's Megatron section. sftkit runs its own engine; only `peft` is honoured."""

    enabled: bool = False  # accepted: sftkit trains with its own engine either way
    checkpoint: MegatronCheckpointConfig = field(default_factory=MegatronCheckpointConfig)
    use_fused_linear_logprobs: bool = False
    fused_linear_logprobs_chunk_size: int = 256
    force_reconvert_from_hf: bool = False
    env_vars: dict[str, Any] = field(default_factory=dict)
    empty_unused_memory_level: int = 1
    activation_checkpointing: bool = False
    cuda_graph_impl: str = "none"
    cuda_graph_modules: list[str] = field(default_factory=list)
    cuda_graph_warmup_steps: int = 3
    fine_grained_activation_offloading: bool = False
    offload_modules: list[str] | None = None
    recompute_granularity: str = "full"
    recompute_modules: list[str] | None = None
    tensor_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    pipeline_dtype: str | None = None  # derived: policy.precision
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    freeze_moe_router: bool = False
    moe_router_dtype: str | None = None
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_bias_update_rate: float = 1.0e-3
    moe_permute_fusion: bool = True
    apply_rope_fusion: bool = True
    bias_activation_fusion: bool = True
    defer_fp32_logits: bool = False
    moe_per_layer_logging: bool = False
    moe_enable_deepep: bool = False
    moe_token_dispatcher_type: str = "alltoall"
    moe_shared_expert_overlap: bool = False
    use_gloo_process_groups: bool = False
    gradient_accumulation_fusion: bool = False
    use_fused_weighted_squared_relu: bool = False
    attention_backend: str | None = None  # Megatron attention kernel (auto, flash, unfused, ...)
    megatron_recipe: str | None = None  # Megatron-Bridge recipe function (newer NeMo RL spelling)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optimizer: MegatronOptimizerConfig = field(default_factory=MegatronOptimizerConfig)
    scheduler: MegatronSchedulerConfig = field(default_factory=MegatronSchedulerConfig)
    distributed_data_parallel_config: MegatronDDPConfig = field(default_factory=MegatronDDPConfig)
    fp8_cfg: Fp8Config = field(default_factory=Fp8Config)


@dataclass
class PolicyConfig:
    model_name: str = "meta-llama/Llama-3.2-1B"  # HF id or local directory
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_global_batch_size: int = 32  # examples per optimizer step, over all ranks
    train_micro_batch_size: int = 1  # examples per forward pass on one rank
    max_total_sequence_length: int = 1024  # longest example in tokens
    precision: str = "bfloat16"  # compute dtype: float32 | bfloat16 | float16
    offload_optimizer_for_logprob: bool = False  # RL-only: offload optimizer during logprobs
    dequantize_base_checkpoint: bool = False  # NeMo Automodel: dequantize (gpt-oss MXFP4) on load
    megatron_recipe: str | None = None  # Megatron-Bridge recipe function (Megatron-only)
    trust_remote_code: bool = False  # sftkit: run model code from the hub (off unless set)
    attn_implementation: str | None = None  # sftkit: sdpa | eager | flex_attention; null picks
    hf_config_overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields to set
    dtensor_cfg: DTensorConfig = field(default_factory=DTensorConfig)
    megatron_cfg: MegatronConfig = field(default_factory=MegatronConfig)
    dynamic_batching: DynamicBatchingConfig = field(default_factory=DynamicBatchingConfig)
    sequence_packing: SequencePackingConfig = field(default_factory=SequencePackingConfig)
    make_sequence_length_divisible_by: int | None = None  # pad to a multiple; derived: TP size
    max_grad_norm: float | None = 1.0  # clip gradients to this norm; null disables clipping
    optimizer: OptimizerConfig | None = field(default_factory=OptimizerConfig)
    scheduler: Any = None  # {name, kwargs} or a list of them plus {milestones: [...]}
    fused_loss_chunk_size: int = 1024  # sftkit: tokens per chunk of the chunked linear + CE


def _default_dataset_defaults() -> dict[str, Any]:
    return {"prompt_file": None, "system_prompt_file": None, "processor": "sft_processor"}


@dataclass
class DataConfig:
    max_input_seq_length: int | None = None  # NeMo RL's cap; derived: max_total_sequence_length
    add_bos: bool = True  # prepend BOS where the template lacks it
    add_eos: bool = True  # append EOS where the template lacks an end-of-turn token
    # headers are never trained; read only by loss_mask: nemo_rl (NeMo RL's meaning)
    add_generation_prompt: bool = False
    shuffle: bool = True  # shuffle training data each epoch
    num_workers: int = 1  # worker processes for tokenization
    train: Any = None  # one dataset config (a mapping) or a list; entries may set name, weight
    validation: Any = None  # one dataset config (a mapping) or a list; entries may set name
    # Keys filled into every dataset config that lacks them.
    default: dict[str, Any] = field(default_factory=_default_dataset_defaults)
    overlong_policy: str = "truncate"  # sftkit: truncate | drop | mask examples over the limit
    drop_untrainable: bool = False  # sftkit: drop (and count) examples with no trained tokens
    reasoning: str = "train"  # sftkit: train | mask | drop_history (assistant reasoning)
    loss_mask: str = "sftkit"  # sftkit | nemo_rl (NeMo RL's per-message chunks, to compare)
    cache_dir: str | None = None  # sftkit: tokenized-data cache; null uses ~/.cache/sftkit/data
    # sftkit: rows with more characters are dropped (and counted) before tokenizing;
    # null: max(1,000,000, 8 x max_input_seq_length)
    max_row_chars: int | None = None  # derived (sftkit.config.derive)
    # The seed's flat form: `dataset_name` and dataset keys (DATASET_KEYS) directly under
    # `data`. The loader moves those keys into `extra`.
    dataset_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def flat_dataset(self) -> dict[str, Any] | None:
        """The dataset config of the flat form (`dataset_name` plus `extra`), or None."""
        if self.dataset_name is None and not self.extra:
            return None
        return {"dataset_name": self.dataset_name, **self.extra}


@dataclass
class WandbConfig:
    project: str = "sft-dev"
    name: str = "sft-dev"
    entity: str | None = None
    mode: str | None = None  # sftkit: online | offline | disabled; null: wandb decides


@dataclass
class TensorboardConfig:
    log_dir: str | None = None  # null: log_dir/exp_NNN/tensorboard


@dataclass
class MlflowConfig:
    experiment_name: str = "sft-dev"
    run_name: str = "sft-dev"
    tracking_uri: str | None = None  # null: a local store under the run's log directory


@dataclass
class SwanlabConfig:
    project: str = "sft-dev"
    name: str = "sft-dev"


@dataclass
class GpuMonitoringConfig:
    collection_interval: float = 10  # seconds between GPU samples
    flush_interval: float = 10  # seconds between metric flushes


@dataclass
class LoggerConfig:
    log_dir: str = "logs"  # runs go to log_dir/exp_NNN/
    wandb_enabled: bool = False  # NeMo RL's sft.yaml: true (sftkit is offline by default)
    tensorboard_enabled: bool = True
    mlflow_enabled: bool = False
    swanlab_enabled: bool = False
    monitor_gpus: bool = True
    num_val_samples_to_print: int = 0  # greedy samples of the first N validation rows
    val_sample_max_new_tokens: int = 128  # sftkit: token budget of each validation sample
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    swanlab: SwanlabConfig = field(default_factory=SwanlabConfig)
    gpu_monitoring: GpuMonitoringConfig = field(default_factory=GpuMonitoringConfig)
    progress_bar: bool = True  # sftkit: a progress bar on interactive terminals


@dataclass
class ClusterConfig:
    gpus_per_node: int = 1  # ranks per node (self-launched when > 1 outside a launcher)
    num_nodes: int = 1
    segment_size: int | None = None  # Ray NVLink-domain alignment
    master_port_range_low: int | None = None  # Ray port range
    master_port_range_high: int | None = None
    device: str = "auto"  # sftkit: auto | cpu | cuda


@dataclass
class MasterConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)


# `None` defaults that the loader fills from another key, as NeMo RL's sft.yaml does with
# an interpolation. A value equal to its derived default counts as a default.
DERIVED_DEFAULTS: dict[str, str] = {
    "policy.tokenizer.name": "policy.model_name",
    "policy.make_sequence_length_divisible_by": "policy.dtensor_cfg.tensor_parallel_size",
    "data.max_input_seq_length": "policy.max_total_sequence_length",
    "policy.megatron_cfg.pipeline_dtype": "policy.precision",
    "policy.megatron_cfg.optimizer.clip_grad": "policy.max_grad_norm",
    "policy.megatron_cfg.scheduler.start_weight_decay": "policy.megatron_cfg.optimizer.weight_decay",
    "policy.megatron_cfg.scheduler.end_weight_decay": "policy.megatron_cfg.optimizer.weight_decay",
}
# Filled with max_total_sequence_length * train_micro_batch_size, NeMo RL's `${mul:...}`.
TOKEN_BUDGET_KEYS = (
    "policy.dynamic_batching.train_mb_tokens",
    "policy.sequence_packing.train_mb_tokens",
)

# Allowed values of choice fields (null is allowed where the field is optional).
CHOICES: dict[str, tuple[str, ...]] = {
    "policy.precision": ("float32", "bfloat16", "float16"),
    "policy.dtensor_cfg.bf16_params_update": ("none", "stochastic_rounding", "kahan"),
    "policy.dtensor_cfg.activation_checkpointing_mode": ("full", "selective"),
    "policy.dtensor_cfg.lora_cfg.dropout_position": ("pre", "post"),
    "policy.dtensor_cfg.lora_cfg.lora_A_init": ("xavier", "uniform"),
    "policy.dtensor_cfg.lora_cfg.lora_dtype": ("float32", "bfloat16", "float16"),
    "policy.megatron_cfg.peft.dropout_position": ("pre", "post"),
    "policy.megatron_cfg.peft.lora_A_init_method": ("xavier", "uniform"),
    "policy.sequence_packing.algorithm": (
        "modified_first_fit_decreasing",
        "first_fit_decreasing",
        "first_fit_shuffle",
        "concatenative",
    ),
    "policy.sequence_packing.microbatch_order": ("packer", "largest_first"),
    "data.overlong_policy": ("truncate", "drop", "mask"),
    "data.reasoning": ("train", "mask", "drop_history"),
    "data.loss_mask": ("sftkit", "nemo_rl"),
    "checkpointing.model_save_format": ("safetensors", "torch_save"),
    "checkpointing.resume_mismatch": ("error", "fresh"),
    "checkpointing.pretrained_checkpoint.format": ("megatron_bridge", "megatron_lm"),
    "logger.wandb.mode": ("online", "offline", "disabled"),
    "cluster.device": ("auto", "cpu", "cuda"),
}

# What sftkit's FP8 (torchao float8 training, `sftkit.model.fp8`) supports of NeMo RL's
# fp8_cfg: its recipes (Megatron's blockwise, delayed and mxfp8 have no torchao equivalent)
# and formats; checked only when fp8_cfg.enabled.
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
FP8_FORMATS = ("e4m3", "hybrid")

# Dataset keys the seed's flat data form puts directly under `data` (NeMo RL's
# ResponseDataset, openai_format and built-in dataset arguments). The loader moves them to
# `data.extra`; other unknown keys under `data` are errors.
DATASET_KEYS: frozenset[str] = frozenset(
    {
        "data_path", "train_data_path", "val_data_path", "input_key", "output_key",
        "chat_key", "system_key", "system_prompt", "tool_key", "use_preserving_dataset",
        "split", "split_validation_size", "seed", "prompt_file", "system_prompt_file",
        "processor", "subset", "max_samples", "download_dir", "repeat", "extract_answer",
        "train_split", "val_split", "train_media_data_dir", "val_media_data_dir",
        "roles_to_train", "train_tool_calls_only",
    }
)  # fmt: skip

# NeMo RL keys sftkit accepts but does not act on, with the reason shown in the warning.
# A path names a key or a whole section (every key below it). Remove an entry when the
# setting starts to be honoured.
IGNORED_KEYS: dict[str, str] = {
    "policy.sequence_packing.microbatch_order": (
        "packed microbatches run in the packer's order (largest_first is not implemented)"
    ),
    "policy.offload_optimizer_for_logprob": "RL-only (no logprob pass in SFT)",
    "policy.dequantize_base_checkpoint": "weights load as transformers stores them",
    "policy.megatron_recipe": "Megatron-only",
    "policy.tokenizer.is_tokenizer_processor": "text-only: the tokenizer is an AutoTokenizer",
    "policy.dtensor_cfg.expert_parallel_size": "no expert parallelism: FSDP2 shards experts",
    "policy.dynamic_batching.logprob_mb_tokens": "RL-only (no logprob pass in SFT)",
    "policy.sequence_packing.logprob_mb_tokens": "RL-only (no logprob pass in SFT)",
    "policy.dtensor_cfg._v2": "both DTensor versions map to sftkit's engine",
    "policy.dtensor_cfg.enabled": "sftkit always trains with its own engine",
    "policy.dtensor_cfg.env_vars": "worker environment variables are not applied",
    "policy.dtensor_cfg.automodel_kwargs": "NeMo Automodel options",
    "policy.megatron_cfg.enabled": "sftkit trains with its own engine (peft is honoured)",
    "policy.megatron_cfg.checkpoint": "Megatron-only",
    "policy.megatron_cfg.use_fused_linear_logprobs": "Megatron-only",
    "policy.megatron_cfg.fused_linear_logprobs_chunk_size": "Megatron-only",
    "policy.megatron_cfg.force_reconvert_from_hf": "Megatron-only",
    "policy.megatron_cfg.env_vars": "Megatron-only",
    "policy.megatron_cfg.empty_unused_memory_level": "Megatron-only",
    "policy.megatron_cfg.activation_checkpointing": "Megatron-only; use dtensor_cfg",
    "policy.megatron_cfg.cuda_graph_impl": "Megatron-only",
    "policy.megatron_cfg.cuda_graph_modules": "Megatron-only",
    "policy.megatron_cfg.cuda_graph_warmup_steps": "Megatron-only",
    "policy.megatron_cfg.fine_grained_activation_offloading": "Megatron-only",
    "policy.megatron_cfg.offload_modules": "Megatron-only",
    "policy.megatron_cfg.recompute_granularity": "Megatron-only",
    "policy.megatron_cfg.recompute_modules": "Megatron-only",
    "policy.megatron_cfg.tensor_model_parallel_size": "Megatron-only; use dtensor_cfg.tensor_parallel_size",
    "policy.megatron_cfg.expert_tensor_parallel_size": "Megatron-only",
    "policy.megatron_cfg.expert_model_parallel_size": "Megatron-only",
    "policy.megatron_cfg.pipeline_model_parallel_size": "Megatron-only (no pipeline parallelism)",
    "policy.megatron_cfg.context_parallel_size": "Megatron-only",
    "policy.megatron_cfg.pipeline_dtype": "Megatron-only",
    "policy.megatron_cfg.num_layers_in_first_pipeline_stage": "Megatron-only",
    "policy.megatron_cfg.num_layers_in_last_pipeline_stage": "Megatron-only",
    "policy.megatron_cfg.sequence_parallel": "Megatron-only; use dtensor_cfg.sequence_parallel",
    "policy.megatron_cfg.freeze_moe_router": "Megatron-only",
    "policy.megatron_cfg.moe_router_dtype": "Megatron-only",
    "policy.megatron_cfg.moe_router_load_balancing_type": "Megatron-only",
    "policy.megatron_cfg.moe_router_bias_update_rate": "Megatron-only",
    "policy.megatron_cfg.moe_permute_fusion": "Megatron-only",
    "policy.megatron_cfg.apply_rope_fusion": "Megatron-only",
    "policy.megatron_cfg.bias_activation_fusion": "Megatron-only",
    "policy.megatron_cfg.defer_fp32_logits": "Megatron-only",
    "policy.megatron_cfg.moe_per_layer_logging": "Megatron-only",
    "policy.megatron_cfg.moe_enable_deepep": "Megatron-only",
    "policy.megatron_cfg.moe_token_dispatcher_type": "Megatron-only",
    "policy.megatron_cfg.moe_shared_expert_overlap": "Megatron-only",
    "policy.megatron_cfg.use_gloo_process_groups": "Megatron-only",
    "policy.megatron_cfg.gradient_accumulation_fusion": "Megatron-only",
    "policy.megatron_cfg.use_fused_weighted_squared_relu": "Megatron-only",
    "policy.megatron_cfg.attention_backend": "Megatron-only",
    "policy.megatron_cfg.megatron_recipe": "Megatron-only",
    "policy.megatron_cfg.peft.a2a_experimental": "Megatron-only communication strategy",
    "policy.megatron_cfg.optimizer": "Megatron-only (lr, betas, eps, weight decay, clip are used)",
    "policy.megatron_cfg.scheduler": "Megatron-only (the lr warmup and decay are used)",
    "policy.megatron_cfg.distributed_data_parallel_config": "Megatron-only",
    "checkpointing.is_async": "saves are synchronous",
    "checkpointing.pretrained_checkpoint": "Megatron checkpoints are not loaded",
    "logger.swanlab_enabled": "no SwanLab sink",
    "cluster.segment_size": "Ray-only",
    "cluster.master_port_range_low": "Ray-only",
    "cluster.master_port_range_high": "Ray-only",
}

# Where the schema default deliberately differs from the value in NeMo RL's
# examples/configs/sft.yaml: that file sets dataset-specific values, and sftkit runs
# offline unless told otherwise. Everything else equals NeMo RL (tested).
DIFFERS_FROM_NEMO_SFT_YAML: dict[str, str] = {
    "policy.tokenizer.chat_template": "absent key means the tokenizer's own template (NeMo RL too)",
    "data.train": "no dataset unless configured",
    "data.validation": "no dataset unless configured",
    "logger.wandb_enabled": "offline by default",
    "logger.wandb.name": "NeMo RL interpolates data.train.dataset_name",
    "logger.swanlab.name": "NeMo RL interpolates data.train.dataset_name",
    "logger.tensorboard.log_dir": "null: inside the run's log directory",
    "logger.mlflow.run_name": "NeMo RL interpolates data.train.dataset_name",
    "logger.mlflow.tracking_uri": "null: a local store, no server",
}
