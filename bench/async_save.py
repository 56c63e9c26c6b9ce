"""What a checkpoint save costs the training loop, synchronous vs `checkpointing.is_async`.

A Llama of about 25M parameters (random weights, the built-in tokenizer) trains on one
sequence a step with fused AdamW on one torch thread, so that a synchronous save (weights
+ Adam moments, about 300 MB, written, fsynced and hashed) takes 5 or more steps' time: a
step of a large model on GPUs against its save to a shared filesystem, scaled down. Both modes
run the real entry point in this process with a save every `--period` steps; per mode:

    step_s          median time of a step with no save near it
    save_pause_s    median time the loop stood still for a save (`timing/train/checkpointing`:
                    the whole save when synchronous, the copy of the state when async)
    save_over_step  median save pause / step_s (synchronous: the save's length in steps)
    during_ratio    median (save pause + the next step) / (2 x step_s): the steps around a
                    save against normal ones (1.0: the save cost the loop nothing)

    python bench/async_save.py [--steps 40] [--period 10] [--tiny]

Timings on a shared machine are noisy: compare the two modes' ratios, each measured within
its own run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not a package: reach bench/results.py by path
    sys.path.insert(0, str(ROOT))

from bench.results import emit  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "quickstart.yaml"


def build_model(path: Path, hidden: int, layers: int) -> None:
    """A random Llama with the built-in model's tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sftkit.model.builtin import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sftkit:tiny-llama"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(work: Path, model: Path, steps: int, period: int, is_async: bool) -> dict[str, Any]:
    import torch

    from sftkit.cli import sft_main

    torch.set_num_threads(1)
    overrides = [
        f"policy.model_name={model}", "policy.train_global_batch_size=1",
        "policy.train_micro_batch_size=1", "policy.max_total_sequence_length=32",
        "++policy.optimizer.kwargs.fused=true",
        f"sft.max_num_steps={steps}", "sft.val_at_start=false", "sft.val_period=0",
        f"checkpointing.checkpoint_dir={work / 'ckpt'}", f"checkpointing.save_period={period}",
        "checkpointing.keep_top_k=2", "checkpointing.metric_name=null",
        f"checkpointing.is_async={str(is_async).lower()}", f"logger.log_dir={work / 'logs'}",
        "logger.tensorboard_enabled=false", "logger.monitor_gpus=false", "cluster.device=cpu",
    ]  # fmt: skip
    assert sft_main(["--config", str(CONFIG), *overrides]) == 0
    rows: dict[int, dict[str, float]] = {}
    for path in (work / "logs").rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "step" in record:
                rows.setdefault(record["step"], {}).update(record)
    step = {s: r["timing/train/total_step_time"] for s, r in rows.items() if s > 2}
    saves = [s for s in range(period, steps, period)]  # the last step's save is waited for
    pause = {s: rows[s]["timing/train/checkpointing"] for s in saves}
    quiet = [t for s, t in step.items() if all(abs(s - v) > 1 for v in saves) and s < steps]
    normal = statistics.median(quiet)
    return {
        "mode": "async" if is_async else "sync",
        "steps": steps,
        "period": period,
        "step_s": round(normal, 4),
        "save_pause_s": round(statistics.median(pause.values()), 4),
        "save_over_step": round(statistics.median(pause.values()) / normal, 2),
        "during_ratio": round(
            statistics.median((pause[s] + step[s + 1]) / (2 * normal) for s in saves), 3
        ),
        "next_step_ratio": round(statistics.median(step[s + 1] / normal for s in saves), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--period", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--tiny", action="store_true", help="a small model, 12 steps: the bench runs"
    )
    parser.add_argument("--out", type=Path, default=Path("async_save.jsonl"))
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.period, args.hidden, args.layers = 12, 5, 64, 2
    with tempfile.TemporaryDirectory(prefix="sftkit-async-bench-") as tmp:
        model = Path(tmp) / "model"
        build_model(model, args.hidden, args.layers)
        for is_async in (False, True):
            work = Path(tmp) / ("async" if is_async else "sync")
            emit(run(work, model, args.steps, args.period, is_async), args.out)


if __name__ == "__main__":
    main()
