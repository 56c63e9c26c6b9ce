"""Evaluate an HF model directory: greedy generation on a local JSONL and a score.

Config (`examples/configs/evals/eval.yaml`, overridable like the training config):
generation.model_name, generation.max_new_tokens, generation.batch_size,
data.data_path, data.problem_key, data.solution_key, data.prompt_file,
eval.metric (exact_match | contains), eval.save_path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sftkit.config.overrides import apply_overrides
from sftkit.config.schema import PolicyConfig

logger = logging.getLogger("sftkit")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_EVAL_CONFIG = REPO / "examples" / "configs" / "evals" / "eval.yaml"


@dataclass
class GenerationSection:
    model_name: str = "results/sft/final_hf"  # HF directory to evaluate
    max_new_tokens: int = 32  # tokens generated per prompt (greedy)
    batch_size: int = 64  # prompts per generate call
    chat_template: str | None = "default"  # as policy.tokenizer.chat_template
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalDataSection:
    data_path: str = "examples/data/addition_validation.jsonl"  # local JSONL
    problem_key: str = "input"  # field holding the prompt
    solution_key: str = "output"  # field holding the reference answer
    prompt_file: str | None = None  # `{}` template applied to the problem, as in training
    max_samples: int | None = None  # evaluate only the first N rows


@dataclass
class EvalSection:
    metric: str = "exact_match"  # exact_match (after whitespace strip) | contains
    save_path: str | None = None  # JSON with score, metric, num_samples, generations


@dataclass
class EvalConfig:
    generation: GenerationSection = field(default_factory=GenerationSection)
    data: EvalDataSection = field(default_factory=EvalDataSection)
    eval: EvalSection = field(default_factory=EvalSection)


METRICS = {
    "exact_match": lambda pred, ref: pred.strip() == ref.strip(),
    "contains": lambda pred, ref: ref.strip() in pred,
}


def load_eval_config(path: str | None, overrides: list[str]) -> EvalConfig:
    tree = OmegaConf.to_container(OmegaConf.load(path or DEFAULT_EVAL_CONFIG), resolve=True)
    apply_overrides(tree, overrides, {}, lambda path, source: None)  # type: ignore[arg-type]
    schema = OmegaConf.structured(EvalConfig)
    try:
        merged = OmegaConf.merge(schema, tree)
    except Exception as err:  # OmegaConf names the bad key and its type
        raise ValueError(f"eval config: {err}") from err
    cfg: EvalConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.eval.metric not in METRICS:
        raise ValueError(f"eval.metric={cfg.eval.metric!r}; choose one of {sorted(METRICS)}")
    return cfg


def read_rows(cfg: EvalDataSection) -> list[dict[str, Any]]:
    rows = []
    with open(cfg.data_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg.data_path}:{line_no}: invalid JSON ({err.msg})") from err
            for key in (cfg.problem_key, cfg.solution_key):
                if key not in row:
                    raise ValueError(
                        f"{cfg.data_path}:{line_no}: no key {key!r}; set data.problem_key / "
                        f"data.solution_key (keys present: {sorted(row)})"
                    )
            rows.append(row)
    return rows[: cfg.max_samples] if cfg.max_samples else rows


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], cfg: GenerationSection) -> list[str]:
    """Greedy completions, batched with left padding."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from sftkit.data.tokenizer import load_tokenizer
    from sftkit.train.dist import pick_device

    t0 = time.monotonic()
    model_dir = cfg.generation.model_name
    if not Path(model_dir).exists() and not model_dir.startswith("sftkit:"):
        logger.info("%s is not a local directory: loading it as a hub id", model_dir)
    policy = PolicyConfig(model_name=model_dir)
    policy.tokenizer.name = model_dir
    policy.tokenizer.chat_template = cfg.generation.chat_template
    tokenizer = load_tokenizer(policy)
    from sftkit.model.builtin import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_dir))
    model.to(pick_device(cfg.generation.device, 0)).eval()
    rows = read_rows(cfg.data)
    template = Path(cfg.data.prompt_file).read_text() if cfg.data.prompt_file else None
    prompts = []
    for row in rows:
        problem = str(row[cfg.data.problem_key])
        content = template.format(problem) if template else problem
        prompts.append(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        )
    predictions = generate(model, tokenizer, prompts, cfg.generation)
    scorer = METRICS[cfg.eval.metric]
    correct = [bool(scorer(p, str(r[cfg.data.solution_key]))) for p, r in zip(predictions, rows, strict=True)]
    return {
        "model": model_dir,
        "dataset": cfg.data.data_path,
        "metric": cfg.eval.metric,
        "score": sum(correct) / max(len(correct), 1),
        "num_samples": len(rows),
        "seconds": round(time.monotonic() - t0, 2),
        "generations": [
            {"prompt": str(r[cfg.data.problem_key]), "generation": p,
             "reference": str(r[cfg.data.solution_key]), "correct": c}
            for r, p, c in zip(rows, predictions, correct, strict=True)
        ],  # fmt: skip
    }


def main(argv: list[str]) -> int:
    from sftkit.log import setup_logging

    parser = argparse.ArgumentParser(prog="run_eval.py")
    parser.add_argument("--config", default=None, help="eval YAML (default: evals/eval.yaml)")
    args, overrides = parser.parse_known_args(argv)
    setup_logging()
    try:
        cfg = load_eval_config(args.config, overrides)
    except ValueError as err:
        print(f"Config error: {err}", file=sys.stderr)
        return 2
    result = evaluate(cfg)
    print(
        f"model {result['model']} | data {result['dataset']} | greedy, "
        f"max_new_tokens {cfg.generation.max_new_tokens} | {result['metric']} "
        f"{result['score']:.4f} ({result['num_samples']} samples, {result['seconds']}s)"
    )
    if cfg.eval.save_path:
        path = Path(cfg.eval.save_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"saved {path}")
    return 0
