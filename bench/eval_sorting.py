"""Eval generation: prompts sorted by length before batching vs batched as they come.

    PYTHONPATH=. python bench/eval_sorting.py [--tiny] [--out results.jsonl]

A random-init Llama (the built-in tiny model's tokenizer, wider layers) generates greedily
for prompts whose token lengths spread over 10x (uniform between `--min-len` and 10x it),
through `sftkit.eval.generate.generate_all`, once unsorted and once sorted, alternating
`--repeats` times. Reports whether the outputs are identical and the sorted / unsorted
ratio of the best CPU seconds (one torch thread: the ratio holds on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch


def make_prompts(tokenizer: Any, count: int, min_len: int, seed: int) -> list[str]:
    """`count` prompts of min_len..10*min_len tokens (uniform), shuffled."""
    rng = random.Random(seed)
    words = ["apple", "seven", "river", "count", "blue", "sum", "three", "node", "plus", "x"]
    prompts = []
    for i in range(count):
        target = min_len + (9 * min_len * i) // max(1, count - 1)
        text = ""
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
            text += " " + rng.choice(words)
        prompts.append(text)
    rng.shuffle(prompts)
    return prompts


def build_model(tokenizer: Any, hidden: int, layers: int, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from sftkit.eval.config import GenerationSection
    from sftkit.eval.generate import generate_all
    from sftkit.model.builtin import resolve_model_path

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sftkit:tiny-llama"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    prompts = make_prompts(tokenizer, args.prompts, args.min_len, args.seed)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    cfg = GenerationSection(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    # Never stop early: both sides then generate the same number of tokens per batch.
    model.generation_config.eos_token_id = None
    cfg.stop_token_ids = None
    seconds: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[str]]] = {}
    for _ in range(args.repeats):
        for sort in (False, True):
            start = time.process_time()
            outputs[sort] = generate_all(model, tokenizer, prompts, cfg, 1, 0, sort=sort)
            seconds[sort].append(time.process_time() - start)
    unsorted, ordered = min(seconds[False]), min(seconds[True])
    return {
        "bench": "eval_sorting",
        "tiny": args.tiny,
        "prompts": len(prompts),
        "prompt_tokens": [min(lengths), max(lengths)],
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "model": f"llama hidden {args.hidden} x {args.layers} layers",
        "unsorted_cpu_s": round(unsorted, 3),
        "sorted_cpu_s": round(ordered, 3),
        "ratio": round(ordered / unsorted, 3),
        "same_outputs": outputs[True] == outputs[False],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds on CPU (tests)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=48, help="shortest prompt, tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON line here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompts, args.min_len, args.batch_size = 16, 24, 4
        args.max_new_tokens, args.hidden, args.layers, args.repeats = 4, 128, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
