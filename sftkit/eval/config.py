"""The eval config: `examples/configs/evals/*.yaml`, NeMo RL's eval keys, overrides.

NeMo RL's eval YAMLs load unchanged (`eval.yaml`, the default, is NeMo RL's own): vLLM,
Ray and cluster settings are accepted and reported once as ignored (sftkit generates with
transformers in this process); the audio / audio-visual ones (`mmau.yaml`,
`daily_omni.yaml`) are refused in one line. The training config's checks
(`sftkit.config.checks`) run on it: unknown keys fail with the nearest valid key, choices
list their values, ignored settings are warned about with the reason; bad values name the
key, the value and the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sftkit.config.checks import check_keys, choice_problems, raise_problems, unknown_key_message
from sftkit.config.errors import ConfigError
from sftkit.config.load import read_config_tree, register_resolvers, warn_ignored
from sftkit.config.overrides import apply_overrides

REPO = Path(__file__).resolve().parents[2]
DEFAULT_EVAL_CONFIG = REPO / "examples" / "configs" / "evals" / "eval.yaml"
QUICKSTART_EVAL_CONFIG = REPO / "examples" / "configs" / "evals" / "quickstart.yaml"
METRICS = ("exact_match", "contains", "pass@k", "cons@k")
VERIFIERS = ("math", "english_multichoice", "multilingual_multichoice")  # env.math.verifier_type
# NeMo RL's audio / audio-visual benchmarks (`MULTIMODAL_DATASETS` at 7ea279ab) and its
# multimodal environment: sftkit evaluates text-only causal LMs.
MULTIMODAL_DATASETS = ("mmau", "TwinkStart/MMAU", "daily-omni")


@dataclass
class GenerationSection:
    model_name: str = "results/quickstart/final_hf"  # HF dir, step_N, PEFT adapter, hub id
    max_new_tokens: int = 32  # tokens generated per prompt
    batch_size: int = 64  # prompts per generate call
    temperature: float = 0.0  # 0 = greedy (NeMo RL's default)
    top_p: float = 1.0  # nucleus sampling, when temperature > 0
    top_k: int = -1  # -1 = off (NeMo RL's convention)
    stop_strings: list[str] | None = None  # a generation is cut at the first of these
    stop_token_ids: list[int] | None = None  # extra end-of-generation token ids
    # NeMo RL's GRPO validation sampling; its eval samples with temperature/top_p/top_k too
    val_temperature: float | None = None
    val_top_p: float | None = None
    val_top_k: int | None = None
    chat_template: str | None = "default"  # as policy.tokenizer.chat_template
    device: str = "auto"  # auto | cpu | cuda
    # NeMo RL keys accepted for compatibility; sftkit uses transformers' generate
    backend: str = "vllm"
    num_prompts_per_step: int = -1
    model_path: str | None = None
    vllm_cfg: dict[str, Any] = field(default_factory=dict)
    colocated: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerSection:
    name: str | None = None  # default: the model's directory
    chat_template: str | None = "default"  # wins over generation.chat_template when not default
    chat_template_kwargs: dict[str, Any] | None = None  # template variables


@dataclass
class EvalDataSection:
    # A benchmark by NeMo RL's name (`sftkit.eval.benchmarks.BENCHMARKS`: AIME2024, math500,
    # gpqa_diamond, mmlu_ZH-CN, ...), else a local file / URL read as NeMo RL's local dataset
    dataset_name: str | None = None
    # A local file (.jsonl/.json/.csv/.parquet/dir): with a benchmark name, that benchmark's
    # rows in its hub columns (offline); alone, rows with problem_key / solution_key
    data_path: str | None = None
    problem_key: str = "input"  # field holding the prompt (local data)
    solution_key: str = "output"  # field holding the reference answer (local data)
    processor: str | None = None  # NeMo RL's processor name; None: the benchmark's own
    repeat: int = 1  # each problem is evaluated this many times (NeMo RL's data.repeat)
    file_format: str | None = None  # csv | json: a URL / path in dataset_name (local_eval)
    prompt_file: str | None = None  # `{}` template applied to the problem, as in training
    system_prompt_file: str | None = None  # inserted as the system message
    max_samples: int | None = None  # evaluate only the first N rows
    split: str | None = None  # for hub ids and dataset directories
    max_input_seq_length: int | None = None  # prompts longer than this are an error
    env_name: str | None = None  # NeMo RL's environment for the rows (vlm: refused)


@dataclass
class MathEnvSection:
    num_workers: int = 8  # NeMo RL's verifier workers
    verifier_type: str | None = None  # math | english_multichoice | multilingual_multichoice
    stop_strings: list[str] | None = None  # NeMo RL's environment stop strings
    math_verify_impl: str | None = None  # NeMo RL's math-verify variant


@dataclass
class EnvSection:
    math: MathEnvSection = field(default_factory=MathEnvSection)


@dataclass
class EvalLoggerSection:
    # A training run's logger.log_dir (or one exp_NNN in it): the score is also logged to
    # that run's metrics.jsonl and trackers (TensorBoard, wandb, MLflow as it enabled them)
    log_dir: str | None = None


@dataclass
class EvalSection:
    metric: str = "exact_match"  # exact_match | contains | pass@k | cons@k (see METRICS)
    num_tests_per_prompt: int = 1  # samples per prompt (pass@k / cons@k)
    k_value: int = 1  # k of pass@k / cons@k
    seed: int = 42  # sampling seed
    save_path: str | None = None  # JSON with score, metric, num_samples, generations
    # JSONL of generations, appended per finished batch: a rerun resumes from it
    generations_path: str | None = None


@dataclass
class EvalConfig:
    generation: GenerationSection = field(default_factory=GenerationSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    env: EnvSection = field(default_factory=EnvSection)
    logger: EvalLoggerSection = field(default_factory=EvalLoggerSection)
    # NeMo RL's cluster: gpus_per_node data-parallel ranks on this node
    cluster: dict[str, Any] = field(default_factory=dict)


# Keys accepted for NeMo RL compatibility, with the reason shown when one is set: a
# non-default value is reported once (as the training config's IGNORED_KEYS).
IGNORED: dict[str, str] = {
    "generation.backend": "sftkit generates with transformers in this process",
    "generation.num_prompts_per_step": "all prompts are generated in batches of batch_size",
    "generation.model_path": "generation.model_name names the model",
    "generation.vllm_cfg": "no vLLM: sftkit generates with transformers",
    "generation.colocated": "no Ray workers: one process",
    "generation.val_temperature": "GRPO's validation sampling; eval samples with temperature",
    "generation.val_top_p": "GRPO's validation sampling; eval samples with top_p",
    "generation.val_top_k": "GRPO's validation sampling; eval samples with top_k",
    "env.math.stop_strings": "generation.stop_strings cuts the generations",
    "env.math.math_verify_impl": "hf_math_verify is the one path (dapo_math_verify is refused)",
    "cluster": "cluster.gpus_per_node ranks generate on this node; the rest is unused",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "eval.metric": METRICS,
    "generation.device": ("auto", "cpu", "cuda"),
    "env.math.verifier_type": VERIFIERS,
    "data.file_format": ("csv", "json"),
    # NeMo RL's processors for text evaluation (its PROCESSOR_REGISTRY; "default" is
    # math_hf_data_processor); its SFT, preference, VLM and gym processors prepare no prompts
    "data.processor": (
        "default",
        "math_hf_data_processor",
        "math_data_processor",
        "multichoice_qa_processor",
    ),
}


def load_eval_config(path: str | None, overrides: list[str]) -> EvalConfig:
    """The eval YAML (with `defaults:` parents) plus overrides, checked against the schema
    with the training config's checks (unknown keys, choices, ignored settings)."""
    register_resolvers()
    tree, sources = read_config_tree(Path(path) if path else DEFAULT_EVAL_CONFIG)
    apply_overrides(tree, overrides, sources, _refuse_multimodal_then_check)
    _refuse_multimodal(tree, sources)
    check_keys(tree, sources, root=EvalConfig)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), tree)
        OmegaConf.resolve(merged)
        cfg: EvalConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except Exception as err:  # OmegaConf names the key; keep its first line only
        key = getattr(err, "full_key", "") or "?"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"eval config {key}: {first} (set in {sources.get(key, '?')})") from None
    _check_values(cfg, sources)
    _drop_matching_val_sampling(cfg.generation)
    warn_ignored(cfg, EvalConfig, IGNORED, "sftkit eval ignores")
    return cfg


def _refuse_multimodal_then_check(path: str, source: str) -> None:
    if path.startswith(("env.vlm", "tokenizer.video", "generation.vllm_kwargs")):
        return  # an audio config's keys: the refusal below names the real reason
    message = unknown_key_message(path, root=EvalConfig)
    if message:
        raise ConfigError(f"{message} (set in {source})", path=path, source=source)


def _refuse_multimodal(tree: dict[str, Any], sources: dict[str, str]) -> None:
    """NeMo RL's audio / audio-visual evals (mmau.yaml, daily_omni.yaml): one line, before
    their multimodal keys (`env.vlm`, `tokenizer.video`) fail as unknown one by one."""
    data = tree.get("data")
    data = data if isinstance(data, dict) else {}
    name, env = data.get("dataset_name"), data.get("env_name")
    if name in MULTIMODAL_DATASETS or env == "vlm":
        key = "data.dataset_name" if name in MULTIMODAL_DATASETS else "data.env_name"
        value = name if key == "data.dataset_name" else env
        raise ConfigError(
            f"{key}={value!r} is an audio / audio-visual evaluation (NeMo RL's mmau.yaml, "
            "daily_omni.yaml, environment vlm): sftkit evaluates text-only causal language "
            "models; use NeMo RL for it, or a text benchmark (examples/configs/evals/).",
            path=key,
            source=sources.get(key, "?"),
        )


def _drop_matching_val_sampling(gen: GenerationSection) -> None:
    """NeMo RL's eval.yaml sets `val_temperature: ${.temperature}` (and top_p, top_k):
    reported only where they differ from what eval samples with."""
    if gen.val_temperature == gen.temperature:
        gen.val_temperature = None
    if gen.val_top_p == gen.top_p:
        gen.val_top_p = None
    if gen.val_top_k == gen.top_k:
        gen.val_top_k = None


def _check_values(cfg: EvalConfig, sources: dict[str, str]) -> None:
    problems = choice_problems(cfg, CHOICES)
    if cfg.eval.num_tests_per_prompt < 1:
        problems.append(("eval.num_tests_per_prompt", "eval.num_tests_per_prompt must be >= 1."))
    elif not 1 <= cfg.eval.k_value <= cfg.eval.num_tests_per_prompt:
        problems.append((
            "eval.k_value",
            f"eval.k_value={cfg.eval.k_value} must be between 1 and eval.num_tests_per_prompt="
            f"{cfg.eval.num_tests_per_prompt}; raise num_tests_per_prompt or lower k_value.",
        ))  # fmt: skip
    if cfg.generation.temperature < 0 or cfg.generation.max_new_tokens < 1:
        problems.append((
            "generation.temperature",
            "generation.temperature must be >= 0 and max_new_tokens >= 1.",
        ))  # fmt: skip
    if cfg.data.repeat < 1:
        problems.append(("data.repeat", f"data.repeat={cfg.data.repeat} must be >= 1."))
    if not cfg.data.dataset_name and not cfg.data.data_path:
        problems.append((
            "data.dataset_name",
            "no data: set data.dataset_name to a benchmark (AIME2024, math500, gpqa_diamond, "
            "mmlu, ...) or data.data_path to a local file with data.problem_key / "
            "data.solution_key columns.",
        ))  # fmt: skip
    raise_problems(problems, sources)
