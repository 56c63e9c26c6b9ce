"""The eval config: `examples/configs/evals/eval.yaml`, NeMo RL's eval keys, overrides.

NeMo RL's eval YAML loads unchanged: vLLM, cluster and env settings are accepted and
reported once as ignored (sftkit generates with transformers in this process). Unknown
keys fail with the nearest valid key; bad values name the key, the value and the type.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sftkit.config.errors import ConfigError
from sftkit.config.load import read_config_tree, register_resolvers
from sftkit.config.overrides import apply_overrides

logger = logging.getLogger("sftkit")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_EVAL_CONFIG = REPO / "examples" / "configs" / "evals" / "eval.yaml"
METRICS = ("exact_match", "contains", "pass@k", "cons@k")


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
    data_path: str = "examples/data/addition_validation.jsonl"  # .jsonl/.json/.csv/.parquet/dir
    problem_key: str = "input"  # field holding the prompt
    solution_key: str = "output"  # field holding the reference answer
    prompt_file: str | None = None  # `{}` template applied to the problem, as in training
    system_prompt_file: str | None = None  # inserted as the system message
    max_samples: int | None = None  # evaluate only the first N rows
    split: str | None = None  # for hub ids and dataset directories
    dataset_name: str | None = None  # NeMo RL's benchmark names need the hub: use data_path
    max_input_seq_length: int | None = None  # prompts longer than this are an error


@dataclass
class EvalSection:
    metric: str = "exact_match"  # exact_match | contains | pass@k | cons@k (exact match)
    num_tests_per_prompt: int = 1  # samples per prompt (pass@k / cons@k)
    k_value: int = 1  # k of pass@k / cons@k
    seed: int = 42  # sampling seed
    save_path: str | None = None  # JSON with score, metric, num_samples, generations


@dataclass
class EvalConfig:
    generation: GenerationSection = field(default_factory=GenerationSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # NeMo RL sections with nothing to do here (math-verify workers, Ray cluster)
    env: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)


# Keys accepted for NeMo RL compatibility: a non-default value is reported once.
IGNORED = (
    "generation.backend", "generation.num_prompts_per_step", "generation.model_path",
    "generation.vllm_cfg", "generation.colocated", "env", "cluster", "logger",
)  # fmt: skip
FREE_FORM = ("generation.vllm_cfg", "generation.colocated", "tokenizer.chat_template_kwargs")


def load_eval_config(path: str | None, overrides: list[str]) -> EvalConfig:
    """The eval YAML (with `defaults:` parents) plus overrides, checked against the schema."""
    register_resolvers()
    tree, sources = read_config_tree(Path(path) if path else DEFAULT_EVAL_CONFIG)
    apply_overrides(tree, overrides, sources, lambda key, source: None)
    _check_keys(tree, EvalConfig, "", sources)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), tree)
        OmegaConf.resolve(merged)
        cfg: EvalConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except Exception as err:  # OmegaConf names the key; keep its first line only
        key = getattr(err, "full_key", "") or "?"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"eval config {key}: {first} (set in {sources.get(key, '?')})") from None
    _check_values(cfg)
    _warn_ignored(cfg)
    return cfg


def _check_keys(node: Any, schema: type, prefix: str, sources: dict[str, str]) -> None:
    if not isinstance(node, dict):
        return
    names = {f.name: f for f in fields(schema)}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
            where = sources.get(path, "the eval config")
            raise ConfigError(f"Unknown eval config key {path!r}.{hint} (set in {where})")
        sub = _dataclass_type(names[key])
        if sub is not None and path not in FREE_FORM:
            _check_keys(value, sub, f"{path}.", sources)


def _dataclass_type(f: Any) -> type | None:
    if f.default_factory is not MISSING:
        made = f.default_factory()
        return type(made) if is_dataclass(made) else None
    return None


def _check_values(cfg: EvalConfig) -> None:
    if cfg.eval.metric not in METRICS:
        raise ConfigError(f"eval.metric={cfg.eval.metric!r}: choose one of {', '.join(METRICS)}.")
    if cfg.eval.num_tests_per_prompt < 1:
        raise ConfigError("eval.num_tests_per_prompt must be >= 1.")
    if not 1 <= cfg.eval.k_value <= cfg.eval.num_tests_per_prompt:
        raise ConfigError(
            f"eval.k_value={cfg.eval.k_value} must be between 1 and eval.num_tests_per_prompt="
            f"{cfg.eval.num_tests_per_prompt}; raise num_tests_per_prompt or lower k_value."
        )
    if cfg.generation.temperature < 0 or cfg.generation.max_new_tokens < 1:
        raise ConfigError("generation.temperature must be >= 0 and max_new_tokens >= 1.")
    if cfg.data.dataset_name:
        raise ConfigError(
            f"data.dataset_name={cfg.data.dataset_name!r}: sftkit evaluates local data only. "
            "Set data.dataset_name=null and data.data_path to a .jsonl file with "
            "data.problem_key / data.solution_key columns."
        )


def _warn_ignored(cfg: EvalConfig) -> None:
    defaults = OmegaConf.structured(EvalConfig)
    ours = OmegaConf.structured(cfg)
    changed = [
        key for key in IGNORED if OmegaConf.select(ours, key) != OmegaConf.select(defaults, key)
    ]
    if changed:
        logger.warning(
            "sftkit eval generates with transformers in one process; ignored: %s",
            ", ".join(changed),
        )
