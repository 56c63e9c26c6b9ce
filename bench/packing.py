"""Padded vs packed SFT on a variable-length chat length distribution (issue 7, bench b).

Length distribution (documented, seeded): chat SFT examples are long-tailed, so lengths are
lognormal, `round(exp(N(ln(median), sigma)))` clipped to [min_len, capacity]:

* GPU mode: median 700 tokens, sigma 0.8 (mean about 960), clipped to [32, 4096];
  Llama-3.2-1B shape, bf16 parameters, fused AdamW, varlen attention.
* `--tiny` (CPU, run by the tests): the same shape scaled by 1/16: median 44, sigma 0.8,
  clipped to [8, 256]; a 2-layer Llama with hidden 64.

Both modes train on the same global batches, in the same order, with the same loss
(`model_hidden_and_head` + `chunked_nll_sum`, summed NLL / trained tokens of the global
batch):

* padded: micro-batches of 4 examples in dataset order, right-padded to the longest
  (rounded up to 64 / 8 tokens), plain causal SDPA;
* packed: MFFD bins of 4 x max length tokens (the padded micro-batch's token bound) per
  global batch, one bin per micro-batch as a single row padded to a multiple of 64 / 8,
  document-isolating attention (`sftkit_packed`).

Reported (one JSON object per line, also appended to `--out` as each case ends): packing
efficiency (real tokens / processed tokens, >= 0.97 required) over 32 global batches of the
distribution, and per mode real (non-pad) tokens/s, padding fraction and the first global
batch's loss (the two modes must agree: that checks packing end to end).

    uv run --group dev python bench/packing.py --tiny          # CPU, seconds
    uv run --group dev python bench/packing.py                 # GPU, about a minute on an H100/H200
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sftkit.batch import PackedBatch, collate_packed, collate_padded, round_up
from sftkit.data.packing import pack_sequences
from sftkit.model.attention import enable_packed_attention
from sftkit.train.loss import chunked_nll_sum, model_hidden_and_head

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or by path
from results import emit  # noqa: E402


@dataclass
class Setup:
    median: float
    sigma: float
    min_len: int
    max_len: int  # longest example
    rows: int  # examples per padded micro-batch; packed micro-batches hold rows * max_len
    pad_multiple: int
    global_batch: int
    steps: int  # global batches measured, after one warm-up batch
    model: dict[str, Any]
    dtype: torch.dtype
    device: str


TINY = Setup(
    median=44, sigma=0.8, min_len=8, max_len=256, rows=4, pad_multiple=8, global_batch=96,
    steps=2, dtype=torch.float32, device="cpu",
    model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2),
)  # fmt: skip
GPU = Setup(
    median=700, sigma=0.8, min_len=32, max_len=4096, rows=4, pad_multiple=64, global_batch=128,
    steps=3, dtype=torch.bfloat16, device="cuda",
    model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               tie_word_embeddings=True),
)  # fmt: skip


def sample_lengths(setup: Setup, count: int, seed: int) -> list[int]:
    """Lognormal chat lengths (see module docstring), clipped to [min_len, max_len]."""
    rng = random.Random(seed)
    mu = math.log(setup.median)
    return [
        min(setup.max_len, max(setup.min_len, round(math.exp(rng.gauss(mu, setup.sigma)))))
        for _ in range(count)
    ]


def make_examples(lengths: list[int], vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Random tokens; the first ~30% of each example is an untrained prompt."""
    rng = random.Random(seed)
    examples = []
    for n in lengths:
        prompt = max(1, int(0.3 * n))
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        examples.append((ids, [0] * prompt + [1] * (n - prompt)))
    return examples


def micro_batches(
    mode: str, examples: list[tuple[list[int], list[int]]], setup: Setup
) -> list[PackedBatch]:
    """The global batch `examples` cut into micro-batches for `mode`."""
    if mode == "padded":
        return [
            collate_padded(examples[i : i + setup.rows], 0, setup.pad_multiple)
            for i in range(0, len(examples), setup.rows)
        ]
    lengths = [len(ids) for ids, _ in examples]
    bins = pack_sequences(lengths, setup.rows * setup.max_len, "modified_first_fit_decreasing")
    # One row per bin, padded only to a multiple: varlen attention does not need equal rows,
    # so the last, partly filled bin of a global batch costs no padding.
    return [
        collate_packed(examples, [b], round_up(sum(lengths[i] for i in b), setup.pad_multiple), 0)
        for b in bins
    ]


def build_model(setup: Setup) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**setup.model, max_position_embeddings=setup.max_len, use_cache=False)
    with torch.device(setup.device):
        model = LlamaForCausalLM(config).to(setup.dtype)
    enable_packed_attention(model)
    return model


def train_global_batch(
    model: torch.nn.Module, opt: torch.optim.Optimizer, mbs: list[PackedBatch]
) -> float:
    """One optimizer step over the micro-batches; returns the global-batch loss."""
    device = next(model.parameters()).device
    targets = sum(mb.num_target_tokens for mb in mbs)
    total = 0.0
    for mb in mbs:
        hidden, weight, labels = model_hidden_and_head(model, mb.to(device))
        loss = chunked_nll_sum(hidden, weight, labels) / targets
        loss.backward()
        total += float(loss.detach())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def run_mode(mode: str, setup: Setup, batches: list[list[tuple[list[int], list[int]]]]) -> dict:
    model = build_model(setup)
    fused = setup.device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    all_mbs = [micro_batches(mode, b, setup) for b in batches]
    real = [sum(len(ids) for ids, _ in b) for b in batches]
    slots = [sum(mb.input_ids.numel() for mb in mbs) for mbs in all_mbs]
    first_loss = train_global_batch(model, opt, all_mbs[0])  # warm-up, not timed
    sync = torch.cuda.synchronize if setup.device == "cuda" else (lambda: None)
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for mbs in all_mbs[1:]:
        train_global_batch(model, opt, mbs)
    sync()
    seconds = time.perf_counter() - start
    result = {
        "real_tokens_per_s": round(sum(real[1:]) / seconds, 1),
        "padding_fraction": round(1 - sum(real) / sum(slots), 4),
        "micro_batches_per_step": round(sum(len(m) for m in all_mbs) / len(all_mbs), 2),
        "first_step_loss": round(first_loss, 5),
        "seconds": round(seconds, 3),
    }
    if setup.device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def packing_efficiency(setup: Setup, seed: int, global_batches: int = 32) -> float:
    """Real / processed tokens of packed micro-batches over `global_batches` of the distribution."""
    capacity = setup.rows * setup.max_len
    real = processed = 0
    for step in range(global_batches):
        lengths = sample_lengths(setup, setup.global_batch, seed + step)
        bins = pack_sequences(lengths, capacity, "modified_first_fit_decreasing")
        real += sum(lengths)
        processed += sum(round_up(sum(lengths[i] for i in b), setup.pad_multiple) for b in bins)
    return real / processed


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU mode with a tiny model")
    parser.add_argument("--global-batch", type=int, help="examples per optimizer step")
    parser.add_argument("--steps", type=int, help="measured optimizer steps (plus 1 warm-up)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, help="CPU threads (1 is steadier on a busy box)")
    parser.add_argument("--out", type=Path, help="append JSON lines here as each case ends")
    args = parser.parse_args(argv)
    base = TINY if args.tiny else GPU
    setup = replace(
        base, global_batch=args.global_batch or base.global_batch, steps=args.steps or base.steps
    )
    if setup.device == "cuda" and not torch.cuda.is_available():
        parser.error("GPU mode needs CUDA; use --tiny on CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    count = setup.global_batch * (setup.steps + 1)
    lengths = sample_lengths(setup, count, args.seed)
    examples = make_examples(lengths, setup.model["vocab_size"], args.seed)
    batches = [examples[i : i + setup.global_batch] for i in range(0, count, setup.global_batch)]
    results = [
        {
            "case": "distribution",
            "lognormal_median": setup.median,
            "lognormal_sigma": setup.sigma,
            "device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "clip": [setup.min_len, setup.max_len],
            "mean_len": round(sum(lengths) / len(lengths), 1),
            "global_batch": setup.global_batch,
            "packed_mb_tokens": setup.rows * setup.max_len,
            "packing_efficiency": round(packing_efficiency(setup, args.seed), 4),
        }
    ]
    emit(results[-1], args.out)
    for mode in ("padded", "packed"):
        results.append({"case": mode, **run_mode(mode, setup, batches)})
        emit(results[-1], args.out)
    speedup = results[2]["real_tokens_per_s"] / results[1]["real_tokens_per_s"]
    results.append({"case": "summary", "packed_over_padded": round(speedup, 3)})
    emit(results[-1], args.out)
    return results


if __name__ == "__main__":
    main()
