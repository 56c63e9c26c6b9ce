"""Evaluate a trained model: generate for a benchmark's prompts and score the answers.

    uv run examples/run_eval.py [--config examples/configs/evals/eval.yaml] [overrides]

`generation.model_name` may be an HF directory (`<checkpoint_dir>/final_hf`), a training
checkpoint (`step_N`, or the checkpoint_dir for its newest: converted to HF on the fly,
as NeMo RL's `convert_dcp_to_hf.py` would), a PEFT adapter directory (`final_adapter`,
merged into its base model), or a hub id. Prompts come from `sftkit.eval.benchmarks`
(NeMo RL's benchmarks and processors, or local data) with the training chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sftkit.checkpoint.layout import CheckpointLayout, StepDir
from sftkit.config.schema import TokenizerConfig
from sftkit.dist import in_launcher, init_distributed, shutdown_distributed
from sftkit.eval.benchmarks import build_items, load_source, prompt_spec
from sftkit.eval.config import EvalConfig, load_eval_config
from sftkit.eval.generate import GenerationStream, generate_all
from sftkit.eval.verify import MathEnv, VerifierPool, pass_at_k, score_groups

logger = logging.getLogger("sftkit")
GATHER_TIMEOUT_S = 6 * 3600.0  # ranks finish their shares within this of each other
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".pt")  # what a fingerprint reads

SCORERS: dict[str, Callable[[str, str], bool]] = {
    "exact_match": lambda pred, ref: pred.strip() == ref.strip(),
    "contains": lambda pred, ref: ref.strip() in pred,
}

QUICKSTART_HINT = (
    " (no --config: this is NeMo RL's eval.yaml, Qwen2.5-Math-1.5B-Instruct on AIME 2024 from "
    "the Hugging Face Hub; offline, score the quick start: uv run examples/run_eval.py --config "
    "examples/configs/evals/quickstart.yaml)"
)

__all__ = ["evaluate", "load_eval_config", "main", "pass_at_k"]


# -- model --------------------------------------------------------------------------------
@contextmanager
def hf_model_dir(model_name: str) -> Iterator[tuple[str, str | None]]:
    """(HF model directory or hub id, PEFT adapter directory or None) for `model_name`."""
    from sftkit.model.builtin import resolve_model_path

    if model_name.startswith("sftkit:"):
        yield str(resolve_model_path(model_name)), None
        return
    path = Path(model_name).expanduser()
    if (path / "config.json").is_file():
        yield str(path), None
    elif (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path.")
        yield str(resolve_model_path(base)), str(path)
    elif CheckpointLayout(path).holds_checkpoints():
        consolidated = StepDir(path).consolidated
        if (consolidated / "config.json").is_file():
            yield str(consolidated), None
            return
        from sftkit.checkpoint.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="sftkit-eval-") as tmp:
            logger.info("converting checkpoint %s to an HF directory in %s", path, tmp)
            export_checkpoint(path, Path(tmp))
            yield tmp, None
    elif path.exists() or model_name.startswith((".", "/", "~")):
        raise ValueError(
            f"generation.model_name={model_name!r} is not an HF model directory (no config.json), "
            "a PEFT adapter (adapter_config.json) or a training checkpoint (step_N). Point it "
            "at <checkpoint_dir>/final_hf, final_adapter or a step_N directory."
        )
    else:
        yield model_name, None  # a hub id


def load_model(model_dir: str, adapter: str | None, device: str, local_rank: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    from sftkit.dist import pick_device

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    except OSError as err:
        raise ValueError(
            f"generation.model_name: cannot load a model from {model_dir!r} "
            f"({str(err).splitlines()[0]}). Give a local HF directory or a reachable hub id."
        ) from None
    if adapter:
        from peft import PeftModel  # an optional dependency, only for adapter directories

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(pick_device(device, local_rank)).eval()


def load_eval_tokenizer(cfg: EvalConfig, model_dir: str, adapter: str | None) -> Any:
    """The tokenizer that trained the model, with the configured chat template."""
    from transformers import AutoTokenizer

    from sftkit.data.tokenizer import resolve_chat_template

    name = cfg.tokenizer.name
    if name in (None, cfg.generation.model_name):
        # NeMo RL's eval.yaml sets tokenizer.name: ${generation.model_name}: the model's own,
        # which for a step_N or an adapter lives elsewhere than the path given
        name = _tokenizer_dir(model_dir, adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"tokenizer.name={name!r}: cannot load a tokenizer ({str(err).splitlines()[0]}). "
            "Set tokenizer.name to a directory with tokenizer files."
        ) from None
    choice = cfg.tokenizer.chat_template
    template = cfg.generation.chat_template if choice == "default" else choice
    spec = TokenizerConfig(chat_template=template)
    try:
        tokenizer.chat_template = resolve_chat_template(spec, tokenizer, name)
    except ValueError as err:  # its text names the training key
        raise ValueError(str(err).replace("policy.tokenizer.", "tokenizer.")) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_dir(model_dir: str, adapter: str | None) -> str:
    """An adapter dir's own tokenizer, else its run's final_hf (training template), else base."""
    if adapter:
        for candidate in (Path(adapter), CheckpointLayout(Path(adapter).parent).final_hf):
            if (candidate / "tokenizer_config.json").is_file():
                return str(candidate)
    return model_dir


# -- generation and scoring -------------------------------------------------------------
def score_prompt(samples: list[str], reference: str, metric: str, k: int) -> tuple[float, bool]:
    """(score of one prompt, whether its first sample is right)."""
    scorer = SCORERS["contains" if metric == "contains" else "exact_match"]
    hits = [scorer(s, reference) for s in samples]
    if metric == "pass@k":
        return pass_at_k(len(hits), sum(hits), k), hits[0]
    if metric == "cons@k":
        vote = Counter(s.strip() for s in samples[:k]).most_common(1)[0][0]
        return float(scorer(vote, reference)), hits[0]
    return sum(hits) / len(hits), hits[0]


def evaluate(cfg: EvalConfig, rank: int = 0, world: int = 1, local_rank: int = 0) -> dict[str, Any]:
    """Generate for every row and score it; the result is what `eval.save_path` receives.
    With several ranks each generates a share; rank 0 scores all and returns the result,
    the others return {}."""
    t0 = time.monotonic()
    torch.manual_seed(cfg.eval.seed)
    source = load_source(cfg)
    spec = prompt_spec(cfg)
    math_env = MathEnv.from_env(cfg.env)  # a bad env.math fails before the model loads
    with hf_model_dir(cfg.generation.model_name) as (model_dir, adapter):
        tokenizer = load_eval_tokenizer(cfg, model_dir, adapter)
        items = build_items(source, spec, tokenizer)
        prompts = [i.prompt for i in items]
        model = load_model(model_dir, adapter, cfg.generation.device, local_rank)
        fingerprint = run_fingerprint(cfg, prompts, model_dir, adapter)
    n = cfg.eval.num_tests_per_prompt
    limit = cfg.data.max_input_seq_length or 0
    path = cfg.eval.generations_path
    stream = GenerationStream(Path(path), fingerprint, rank, world) if path else None
    samples = generate_all(model, tokenizer, prompts, cfg.generation, n, limit,
                           seed=cfg.eval.seed, stream=stream, rank=rank, world=world)  # fmt: skip
    if rank != 0:
        return {}
    references = [item.reference for item in items]
    timed_out = 0
    if cfg.eval.metric in ("pass@k", "cons@k"):  # NeMo RL's metrics: its answer checks
        with VerifierPool(source.verifier, math_env.num_workers) as pool:
            checked = score_groups(pool, samples, references, cfg.eval.metric, cfg.eval.k_value)
            timed_out = pool.timed_out
        results = [(c.value, c.first_right) for c in checked]
    else:
        results = [score_prompt(g, r, cfg.eval.metric, cfg.eval.k_value)
                   for g, r in zip(samples, references, strict=True)]  # fmt: skip
    generations = []
    for item, group, reference, (value, first_right) in zip(
        items, samples, references, results, strict=True
    ):
        entry = {"prompt": item.problem, "generation": group[0],
                 "reference": reference, "correct": first_right, "score": value}  # fmt: skip
        if n > 1:
            entry["samples"] = group
        generations.append(entry)
    return {
        "model": cfg.generation.model_name,
        "dataset": source.name,
        "verifier": source.verifier,
        "metric": cfg.eval.metric,
        "k": cfg.eval.k_value,
        "num_tests_per_prompt": n,
        "temperature": cfg.generation.temperature,
        "score": sum(v for v, _ in results) / max(len(results), 1),
        "num_samples": len(items),
        "verify_timed_out": timed_out,  # answers whose check was killed (scored 0)
        "seconds": round(time.monotonic() - t0, 2),
        "generations": generations,
    }


def run_fingerprint(
    cfg: EvalConfig, prompts: list[str], model_dir: str, adapter: str | None
) -> dict[str, Any]:
    """What makes a streamed generation reusable: the model (and its weight files' sizes
    and times, so a retrained final_hf is not mistaken for the old one), the prompts and
    the sampling settings."""
    # The configured path, not model_dir: a step_N checkpoint is converted into a new
    # temporary directory on every run.
    local = Path(cfg.generation.model_name).expanduser()
    roots = [local if local.exists() else Path(model_dir), *([Path(adapter)] if adapter else [])]
    weights = sorted(
        f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}"
        for root in roots if root.is_dir()
        for file in root.rglob("*") if file.suffix in WEIGHT_SUFFIXES
    )  # fmt: skip
    gen = cfg.generation
    return {
        "model": gen.model_name,
        "weights": hashlib.sha256("|".join(weights).encode()).hexdigest()[:16],
        "prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16],
        "num_prompts": len(prompts),
        "n": cfg.eval.num_tests_per_prompt,
        "seed": cfg.eval.seed,
        "sampling": [gen.temperature, gen.top_p, gen.top_k, gen.max_new_tokens],
        "stop": [gen.stop_strings, gen.stop_token_ids],
    }


def main(argv: list[str]) -> int:
    """`examples/run_eval.py` and `sftkit eval` (errors: `sftkit.cli.eval_main`)."""
    from sftkit.errors import ArgumentParser
    from sftkit.log import redact, scrub, setup_logging

    parser = ArgumentParser(prog="run_eval.py")
    parser.add_argument("--config", default=None, help="eval YAML (default: evals/eval.yaml)")
    args, overrides = parser.parse_known_args(argv)
    setup_logging()
    cfg = load_eval_config(args.config, overrides)
    ranks = int(cfg.cluster.get("gpus_per_node", 1) or 1)
    if int(cfg.cluster.get("num_nodes", 1) or 1) > 1:
        raise ValueError(
            f"cluster.num_nodes={cfg.cluster['num_nodes']}: sftkit eval generates on one node; "
            "set cluster.num_nodes=1 and cluster.gpus_per_node to this node's GPUs."
        )
    offline_if_unreachable(cfg)
    if ranks > 1 and not in_launcher(os.environ):  # data-parallel: this node's ranks
        from sftkit.lifecycle.launch import launch_ranks

        return launch_ranks(ranks, cfg.generation.device, ["eval", *argv])
    # Ranks wait for each other only at the gather after generating their shares: one
    # rank's share can run past torch's 10-minute NCCL default on a long benchmark.
    env = init_distributed(cfg.generation.device, collective_timeout_s=GATHER_TIMEOUT_S)
    try:
        result = evaluate(cfg, env.rank, env.world_size, env.local_rank)
    except Exception as err:
        if (
            args.config is None
        ):  # NeMo RL's eval.yaml (hub model and benchmark): name the offline one
            from sftkit.errors import add_usage_hint

            add_usage_hint(err, QUICKSTART_HINT)
        raise
    finally:
        shutdown_distributed()
    if not env.is_main:
        return 0
    result = redact(result)  # a model URL's password, a token in a generation
    gen = cfg.generation
    sampling = "greedy" if gen.temperature == 0 else f"temperature {gen.temperature}"
    metric = result["metric"].replace("@k", f"@{cfg.eval.k_value}")
    timed_out = (
        f", {result['verify_timed_out']} checks timed out" if result["verify_timed_out"] else ""
    )
    print(scrub(
        f"model {result['model']} | data {result['dataset']} | {sampling}, max_new_tokens "
        f"{gen.max_new_tokens} | {metric} {result['score']:.4f} ({result['num_samples']} "
        f"samples{timed_out}, {result['seconds']}s)"
    ))  # fmt: skip
    if cfg.eval.save_path:
        print(f"saved {save_result(result, cfg, Path(cfg.eval.save_path))}")
    if cfg.logger.log_dir:
        from sftkit.eval.track import log_to_run, metric_names

        exp_dir = log_to_run(cfg.logger.log_dir, cfg.generation.model_name, metric_names(result))
        print(f"logged to the run in {exp_dir}")
    return 0


def offline_if_unreachable(cfg: EvalConfig) -> bool:
    """Probe the hub once when the model, tokenizer or benchmark may come from it; offline
    mode when unreachable, so a missing file fails in seconds, not after minutes of retries
    (as `sftkit.hub.offline_if_unreachable` does for training)."""
    from sftkit.hub import hub_offline, hub_reachable, may_use_hub, set_offline

    data = cfg.data.data_path or cfg.data.dataset_name
    names = [cfg.generation.model_name, cfg.tokenizer.name, data]
    if hub_offline() or not may_use_hub(names) or hub_reachable():
        return False
    set_offline()
    logger.info("The Hugging Face Hub is unreachable: using only locally cached files.")
    return True


def save_result(result: dict[str, Any], cfg: EvalConfig, path: Path) -> Path:
    """`*.json`: one file, the score, the generations and the config (`config`); any other
    path is a directory, as NeMo RL's save_path: `config.json` and `evaluation_data.json`."""
    import dataclasses

    from sftkit.log import redact

    config = redact(dataclasses.asdict(cfg))
    if path.suffix == ".json":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "config": config}, indent=1))
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "evaluation_data.json").write_text(json.dumps(result, indent=1))
    return path
