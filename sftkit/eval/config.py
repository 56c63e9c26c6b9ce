"""The eval config: `examples/configs/evals/eval.yaml`, NeMo RL's eval keys, overrides.

NeMo RL's eval YAML loads unchanged: vLLM, cluster and env settings are accepted and
reported once as ignored (sftkit generates with transformers in this process). The
training config's checks (`sftkit.config.checks`) run on it: unknown keys fail with the
nearest valid key, choices list their values, ignored settings are warned about with the
reason; bad values name the key, the value and the type.
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
    # NeMo RL's env.math (verifier_type, num_workers: `sftkit.eval.verify.MathEnv`) and
    # cluster (gpus_per_node: data-parallel ranks)
    env: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)


# Keys accepted for NeMo RL compatibility, with the reason shown when one is set: a
# non-default value is reported once (as the training config's IGNORED_KEYS).
IGNORED: dict[str, str] = {
    "generation.backend": "sftkit generates with transformers in this process",
    "generation.num_prompts_per_step": "all prompts are generated in batches of batch_size",
    "generation.model_path": "generation.model_name names the model",
    "generation.vllm_cfg": "no vLLM: sftkit generates with transformers",
    "generation.colocated": "no Ray workers: one process",
    "cluster": "cluster.gpus_per_node ranks generate on this node; the rest is unused",
    "logger": "results go to stdout and eval.save_path",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "eval.metric": METRICS,
    "generation.device": ("auto", "cpu", "cuda"),
}


def load_eval_config(path: str | None, overrides: list[str]) -> EvalConfig:
    """The eval YAML (with `defaults:` parents) plus overrides, checked against the schema
    with the training config's checks (unknown keys, choices, ignored settings)."""
    register_resolvers()
    tree, sources = read_config_tree(Path(path) if path else DEFAULT_EVAL_CONFIG)
    apply_overrides(tree, overrides, sources, _check_known)
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
    warn_ignored(cfg, EvalConfig, IGNORED, "sftkit eval ignores")
    return cfg


def _check_known(path: str, source: str) -> None:
    message = unknown_key_message(path, root=EvalConfig)
    if message:
        raise ConfigError(f"{message} (set in {source})", path=path, source=source)


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
    if cfg.data.dataset_name:
        problems.append((
            "data.dataset_name",
            f"data.dataset_name={cfg.data.dataset_name!r}: sftkit evaluates local data only. "
            "Set data.dataset_name=null and data.data_path to a .jsonl file with "
            "data.problem_key / data.solution_key columns.",
        ))  # fmt: skip
    raise_problems(problems, sources)
