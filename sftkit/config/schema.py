"""The typed config: NeMo RL's SFT key tree with NeMo RL's documented defaults.

Every section is a dataclass; `sftkit.config.load` merges user YAML into it, so unknown
keys and wrong types are rejected when the config is loaded. A `None` default marked
"derived" is filled at load time with the value NeMo RL writes as an interpolation
(`policy.tokenizer.name: ${policy.model_name}`), see `DERIVED_DEFAULTS`. Keys that NeMo RL
defines but sftkit does not act on are listed in `IGNORED_KEYS` and reported in one
warning when set to a non-default value. Choice-valued fields are plain `str` (OmegaConf
cannot type `Literal`); their allowed values are in `CHOICES` and checked at load time.
Each key's one-line doc is its field's metadata (`doc()`), printed by `sftkit keys`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftkit.config.keydoc import doc
from sftkit.config.schema_megatron import Fp8Config, MegatronConfig

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
    """Steps, epochs, validation period, seed."""

    max_num_epochs: int = doc(1, "stop after this many passes over the training data")
    max_num_steps: int = doc(60, "stop after this many optimizer steps")
    val_period: int = doc(10, "validate every N steps; <= 0 disables periodic validation")
    val_batches: int = doc(8, "validation batches per validation; <= 0 means the whole set")
    val_global_batch_size: int = doc(32, "examples per validation batch")
    val_micro_batch_size: int = doc(1, "examples per validation forward pass")
    val_at_start: bool = doc(True, "validate before the first step (fresh runs only)")
    val_at_end: bool = doc(False, "validate after the last step")
    seed: int = doc(42, "seeds Python, NumPy and torch (and the data order)")
    only_unmask_final: bool = doc(False, "train only the final assistant turn")


@dataclass
class PretrainedCheckpointConfig:
    path: str | None = doc(None, "Megatron checkpoint to start from (not supported by sftkit)")
    format: str = doc("megatron_bridge", "megatron_bridge | megatron_lm")


@dataclass
class CheckpointingConfig:
    """checkpoint_dir, save period, kept checkpoints, resume."""

    enabled: bool = doc(True, "write checkpoints and resume from them")
    checkpoint_dir: str = doc("results/sft", "where step_N/ and final_hf/ are written")
    metric_name: str | None = doc("val:val_loss", "ranks checkpoints: val:<name> or train:<name>")
    higher_is_better: bool = doc(False, "direction of metric_name")
    keep_top_k: int | None = doc(3, "best checkpoints kept (the latest is always kept); null: all")
    save_period: int = doc(10, "save every N steps (and at the end)")
    checkpoint_must_save_by: str | None = doc(None, '"DD:HH:MM:SS" budget: save and stop before it')
    save_optimizer: bool = doc(True, "include optimizer and scheduler state")
    model_save_format: str = doc("safetensors", "weights format inside checkpoints")
    save_consolidated: bool = doc(False, "also write an HF-loadable directory at each save")
    is_async: bool = doc(
        False, "save in the background: training goes on while a save is written (one at a time)"
    )
    ft_save_period: int | None = doc(None, 'extra "fault tolerance" save period in steps')
    ft_keep_latest_k: int | None = doc(None, "always keep the latest k checkpoints")
    resume: bool = doc(
        True, "resume from the latest complete checkpoint in checkpoint_dir", nemo=False
    )
    resume_mismatch: str = doc(
        "error", "error | fresh | stage (new data, same run), when settings differ", nemo=False
    )
    take_over_lock: bool = doc(
        False, "take another run's lock on checkpoint_dir (it is dead)", nemo=False
    )
    pretrained_checkpoint: PretrainedCheckpointConfig = field(
        default_factory=PretrainedCheckpointConfig
    )


@dataclass
class TokenizerConfig:
    name: str | None = doc(None, "HF id or local directory; derived: policy.model_name")
    chat_template: str | None = doc(
        "default", '"default" | null (passthrough) | Jinja | path.jinja'
    )
    custom_template: str | None = doc(
        None, "seed guide's spelling; if set, loaded as chat_template"
    )
    chat_template_kwargs: dict[str, Any] | None = doc(None, "template variables: enable_thinking")
    is_tokenizer_processor: bool = doc(False, "NeMo RL VLM: load an AutoProcessor (text-only here)")


@dataclass
class LoraConfig:
    enabled: bool = doc(False, "train low-rank adapters instead of all weights")
    target_modules: list[str] = doc(factory=list, text="module names or wildcards to adapt")
    exclude_modules: list[str] = doc(factory=list, text="module names or wildcards to skip")
    match_all_linear: bool = doc(True, "adapt every linear layer (overrides target_modules)")
    dim: int = doc(8, "rank r")
    alpha: float = doc(32, "scale = alpha / dim")
    dropout: float = doc(0.0, "dropout probability on the LoRA branch, in [0, 1)")
    dropout_position: str = doc("post", "pre: on the LoRA input | post: on the LoRA output")
    lora_A_init: str = doc("xavier", "xavier (normal) | uniform (kaiming)")
    use_dora: bool = doc(
        False,
        "DoRA (PEFT's and Automodel's use_dora): a trained magnitude per output row times the normalised W + s B A; exported in PEFT's format",
    )
    use_triton: bool = doc(True, "fused Triton kernels on GPU when tensor parallelism is off")
    lora_dtype: str = doc(
        "float32",
        "adapter weight dtype; float32 as NeMo RL forces (FSDP needs one dtype per group); "
        "Megatron's peft.lora_dtype is translated into it",
        nemo=False,
    )
    quantize_base: str | None = doc(
        None,
        "QLoRA: nf4 stores the frozen base linear layers as 4-bit NF4 (torchao, double-"
        "quantized scales), quantized while loading; the head and embeddings stay dense | null",
        nemo=False,
    )
    quantize_compute_dtype: str | None = doc(
        None, "dtype NF4 weights dequantize to for the matmuls; null: policy.precision", nemo=False
    )
    quantize_block_size: int = doc(
        64, "weights per NF4 scale; must divide each quantized weight's size", nemo=False
    )
    quantize_scaler_block_size: int = doc(
        256,
        "NF4 scales per double-quantization block, at most (the largest divisor of a weight's "
        "block count up to this is used)",
        nemo=False,
    )
    target_experts: bool = doc(
        False,
        "also adapt MoE experts' fused 3-D weights (gate_up_proj, down_proj: per-expert A and B, "
        "W + scale * B @ A each forward); exported as PEFT's target_parameters (PEFT >= 0.17); "
        "needs dropout 0 and tensor_parallel_size 1",
        nemo=False,
    )


@dataclass
class DTensorConfig:
    _v2: bool = doc(True, "NeMo RL DTensor worker version (both map to sftkit's engine)")
    enabled: bool = doc(True, "use the DTensor/FSDP2 engine")
    env_vars: dict[str, Any] = doc(factory=dict, text="environment for the workers")
    cpu_offload: bool = doc(False, "FSDP2 CPU offload of parameters and gradients")
    sequence_parallel: bool = doc(False, "shard activations along the sequence in TP regions")
    activation_checkpointing: bool = doc(False, "recompute decoder layers in backward")
    activation_checkpointing_mode: str = doc(
        "full",
        "with activation_checkpointing: full (keep each layer's input only) | selective (also keep matmul and attention outputs, recompute the elementwise rest: less recompute, more memory)",
        nemo=False,
    )
    activation_offload: bool = doc(
        False,
        "keep saved activations in pinned host memory (torch save_on_cpu), per decoder layer; with activation_checkpointing only the layer inputs go: the long-context setting",
        nemo=False,
    )
    tensor_parallel_size: int = doc(1, "tensor parallel degree")
    context_parallel_size: int = doc(1, "ranks each sequence is split over (context parallel)")
    dp_replicate_size: int = doc(
        1, "HSDP: FSDP2 shards within world/(R x TP) ranks, replicates R times"
    )
    expert_parallel_size: int = doc(
        1,
        "MoE expert parallel degree: ranks (taken from the FSDP ranks) that split the experts, E / ep each, tokens exchanged by all-to-all; 1: FSDP2 shards the experts like any weight",
    )
    custom_parallel_plan: str | None = doc(None, "dotted path to a TP plan")
    automodel_kwargs: dict[str, Any] = doc(factory=dict, text="NeMo Automodel options")
    lora_cfg: LoraConfig = field(default_factory=LoraConfig)
    bf16_params: bool = doc(
        False, "keep parameters in bf16 (less memory, no fp32 master)", nemo=False
    )
    bf16_params_update: str = doc(
        "none",
        "how AdamW writes float32 updates into bf16 parameters: none (round to nearest: small updates are lost) | stochastic_rounding | kahan (+2 B/param)",
        nemo=False,
    )
    fp8_cfg: Fp8Config = field(
        default_factory=lambda: Fp8Config(fp8="hybrid", fp8_recipe="tensorwise"),
        metadata={"doc": "FP8 linear layers through torchao (NeMo RL's spelling)", "nemo": False},
    )
    compile: bool = doc(False, "torch.compile each decoder layer", nemo=False)
    fused_kernels: bool = doc(
        True, "fused RMSNorm/SwiGLU/RoPE kernels on CUDA (Liger if installed)", nemo=False
    )


@dataclass
class DynamicBatchingConfig:
    enabled: bool = doc(False, "form micro-batches by a token budget instead of a count")
    train_mb_tokens: int | None = doc(None, "tokens per micro-batch; derived: seq len * micro bs")
    sequence_length_round: int = doc(64, "round lengths up to a multiple of this")
    logprob_mb_tokens: int | None = doc(None, "RL-only: token budget of the logprob pass")


@dataclass
class SequencePackingConfig(DynamicBatchingConfig):
    algorithm: str = doc("modified_first_fit_decreasing", "bin packing algorithm")
    microbatch_order: str = doc("packer", "packer | largest_first")


@dataclass
class OptimizerConfig:
    name: str = doc("torch.optim.AdamW", "dotted path of the optimizer class")
    kwargs: dict[str, Any] = doc(
        text="keyword arguments of the optimizer class",
        factory=lambda: {
            "lr": 5.0e-6,
            "weight_decay": 0.1,
            "betas": [0.9, 0.98],
            "eps": 1.0e-5,
            "foreach": False,
            "fused": False,
        },
    )


@dataclass
class PolicyConfig:
    """Model, tokenizer, batch sizes, precision, parallelism, LoRA, optimizer, packing."""

    model_name: str = doc("meta-llama/Llama-3.2-1B", "HF id or local directory")
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_global_batch_size: int = doc(32, "examples per optimizer step, over all ranks")
    train_micro_batch_size: int = doc(1, "examples per forward pass on one rank")
    max_total_sequence_length: int = doc(1024, "longest example in tokens")
    precision: str = doc("bfloat16", "compute dtype: float32 | bfloat16 | float16")
    offload_optimizer_for_logprob: bool = doc(False, "RL-only: offload optimizer during logprobs")
    dequantize_base_checkpoint: bool = doc(
        False, "load a gpt-oss MXFP4 checkpoint's experts dequantized (required for one)"
    )
    megatron_recipe: str | None = doc(None, "Megatron-Bridge recipe function (Megatron-only)")
    trust_remote_code: bool = doc(False, "run model code from the hub (off unless set)", nemo=False)
    attn_implementation: str | None = doc(
        None, "sdpa | eager | flex_attention; null picks", nemo=False
    )
    hf_config_overrides: dict[str, Any] = doc(factory=dict, text="HF config fields to set")
    dtensor_cfg: DTensorConfig = field(default_factory=DTensorConfig)
    megatron_cfg: MegatronConfig = field(default_factory=MegatronConfig)
    dynamic_batching: DynamicBatchingConfig = field(default_factory=DynamicBatchingConfig)
    sequence_packing: SequencePackingConfig = field(default_factory=SequencePackingConfig)
    make_sequence_length_divisible_by: int | None = doc(None, "pad to a multiple; derived: TP size")
    max_grad_norm: float | None = doc(1.0, "clip gradients to this norm; null disables clipping")
    optimizer: OptimizerConfig | None = field(default_factory=OptimizerConfig)
    scheduler: Any = doc(None, "{name, kwargs} or a list of them plus {milestones: [...]}")
    fused_loss_chunk_size: int = doc(
        1024, "tokens per chunk of the chunked linear + CE", nemo=False
    )


def _default_dataset_defaults() -> dict[str, Any]:
    return {"prompt_file": None, "system_prompt_file": None, "processor": "sft_processor"}


@dataclass
class DataConfig:
    """Datasets (train, validation), template handling, length policy, cache."""

    max_input_seq_length: int | None = doc(
        None, "NeMo RL's cap; derived: max_total_sequence_length"
    )
    add_bos: bool = doc(True, "prepend BOS where the template lacks it")
    add_eos: bool = doc(True, "append EOS where the template lacks an end-of-turn token")
    add_generation_prompt: bool = doc(
        False, "headers are never trained; read only by loss_mask: nemo_rl (NeMo RL's meaning)"
    )
    shuffle: bool = doc(True, "shuffle training data each epoch")
    num_workers: int = doc(1, "worker processes for tokenization")
    train: Any = doc(None, "one dataset config (a mapping) or a list; entries may set name, weight")
    validation: Any = doc(None, "one dataset config (a mapping) or a list; entries may set name")
    default: dict[str, Any] = doc(
        factory=_default_dataset_defaults,
        text="keys filled into every dataset config that lacks them",
    )
    overlong_policy: str = doc(
        "truncate", "truncate | drop | mask examples over the limit", nemo=False
    )
    drop_untrainable: bool = doc(
        False, "drop (and count) examples with no trained tokens", nemo=False
    )
    reasoning: str = doc("train", "train | mask | drop_history (assistant reasoning)", nemo=False)
    loss_mask: str = doc(
        "sftkit", "sftkit | nemo_rl (NeMo RL's per-message chunks, to compare)", nemo=False
    )
    cache_dir: str | None = doc(
        None, "tokenized-data cache; null uses ~/.cache/sftkit/data", nemo=False
    )
    cache_scope: str = doc(
        "node",
        "node | shared: on a cache miss one process per node prepares the data (cache_dir on "
        "each node's own disk) or one in the whole run (a cache_dir every node sees); the "
        "other ranks wait and map its entry",
        nemo=False,
    )
    prepare_timeout_s: float = doc(
        7200.0,
        "seconds the other ranks wait for the preparing process before stopping the run",
        nemo=False,
    )
    max_row_chars: int | None = doc(
        None,
        "rows with more characters are dropped (and counted) before tokenizing; derived: "
        "max(1,000,000, 8 x max_input_seq_length)",
        nemo=False,
    )
    dataset_name: str | None = doc(
        None, "the seed's flat form: the dataset name directly under data"
    )
    extra: dict[str, Any] = doc(
        factory=dict, text="the flat form's dataset keys (DATASET_KEYS), moved here by the loader"
    )

    def flat_dataset(self) -> dict[str, Any] | None:
        """The dataset config of the flat form (`dataset_name` plus `extra`), or None."""
        if self.dataset_name is None and not self.extra:
            return None
        return {"dataset_name": self.dataset_name, **self.extra}


@dataclass
class WandbConfig:
    project: str = doc("sft-dev", "W&B project name")
    name: str = doc("sft-dev", "W&B run name")
    entity: str | None = doc(None, "W&B W&B entity (team or user)")
    mode: str | None = doc(None, "online | offline | disabled; null: wandb decides", nemo=False)


@dataclass
class TensorboardConfig:
    log_dir: str | None = doc(None, "null: log_dir/exp_NNN/tensorboard")


@dataclass
class MlflowConfig:
    experiment_name: str = doc("sft-dev", "MLflow experiment name")
    run_name: str = doc("sft-dev", "MLflow run name")
    tracking_uri: str | None = doc(None, "null: a local store under the run's log directory")


@dataclass
class SwanlabConfig:
    project: str = doc("sft-dev", "SwanLab project name")
    name: str = doc("sft-dev", "SwanLab run name")


@dataclass
class GpuMonitoringConfig:
    collection_interval: float = doc(10, "seconds between GPU samples")
    flush_interval: float = doc(10, "seconds between metric flushes")


@dataclass
class LoggerConfig:
    """Log directory (exp_NNN/), TensorBoard, W&B, MLflow, validation samples."""

    log_dir: str = doc("logs", "runs go to log_dir/exp_NNN/")
    wandb_enabled: bool = doc(False, "NeMo RL's sft.yaml: true (sftkit is offline by default)")
    tensorboard_enabled: bool = doc(True, "write TensorBoard event files")
    mlflow_enabled: bool = doc(False, "log to MLflow")
    swanlab_enabled: bool = doc(False, "log to SwanLab")
    monitor_gpus: bool = doc(True, "log GPU utilisation and memory")
    num_val_samples_to_print: int = doc(0, "greedy samples of the first N validation rows")
    val_sample_max_new_tokens: int = doc(128, "token budget of each validation sample", nemo=False)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    swanlab: SwanlabConfig = field(default_factory=SwanlabConfig)
    gpu_monitoring: GpuMonitoringConfig = field(default_factory=GpuMonitoringConfig)
    progress_bar: bool = doc(True, "a progress bar on interactive terminals", nemo=False)


@dataclass
class ClusterConfig:
    """Ranks per node, nodes, device."""

    gpus_per_node: int = doc(1, "ranks per node (self-launched when > 1 outside a launcher)")
    num_nodes: int = doc(1, "nodes in the job")
    segment_size: int | None = doc(None, "Ray NVLink-domain alignment")
    master_port_range_low: int | None = doc(None, "Ray port range")
    master_port_range_high: int | None = doc(None, "Ray port range")
    device: str = doc("auto", "auto | cpu | cuda", nemo=False)
    collective_timeout_s: int = doc(
        600,
        "seconds any collective (all-reduce, barrier) may wait for a rank before the job ends "
        "naming the stalled rank (torch's own default: 30 min on gloo, 10 on NCCL)",
        nemo=False,
    )


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
    "policy.dtensor_cfg.lora_cfg.quantize_base": ("nf4",),
    "policy.dtensor_cfg.lora_cfg.quantize_compute_dtype": ("float32", "bfloat16", "float16"),
    "policy.megatron_cfg.peft.quantize_base": ("nf4",),
    "policy.megatron_cfg.peft.quantize_compute_dtype": ("float32", "bfloat16", "float16"),
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
    "data.cache_scope": ("node", "shared"),
    "checkpointing.model_save_format": ("safetensors", "torch_save"),
    "checkpointing.resume_mismatch": ("error", "fresh", "stage"),
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
    "policy.megatron_recipe": "Megatron-only",
    "policy.tokenizer.is_tokenizer_processor": "text-only: the tokenizer is an AutoTokenizer",
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
