"""Data preparation speed: sftkit against TRL's SFTTrainer, on the same conversations.

    uv run bench/data_prep.py                 # 20k multi-turn conversations, 2 workers, 3 rounds
    uv run bench/data_prep.py --num 5000 --workers 4 --repeat 1
    uv run bench/data_prep.py --tiny          # a few hundred rows: checks that both paths run

Both sides start from the same JSONL file with cold caches (fresh cache directories every
round), use the same ChatML template (carrying `{% generation %}` tags so TRL's
`assistant_only_loss` works) and the same tokenizer (a byte-level BPE trained here, no
download), and the same number of worker processes (TRL `dataset_num_proc`, sftkit
`data.num_workers`). TRL's path is `SFTTrainer._prepare_dataset`, the code
`SFTTrainer.__init__` runs on the train set: `datasets.map` with `num_proc` over
`apply_chat_template(..., return_assistant_tokens_mask=True)`, then its label, truncation
and filter passes. `TOKENIZERS_PARALLELISM=false`, so neither side uses more cores than
its workers (sftkit's batched tokenizer calls would otherwise add Rust threads).

Rounds alternate which side goes first, so a load change on a shared machine does not
always hit the same side. Prints samples/s (wall clock) and CPU seconds (all processes)
for both, the ratio per round and its median, and checks that both sides produced the
same token ids and the same trained tokens for every conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WORDS = (
    "the model data answer question because value number system paris weather city "
    "compute result first then finally explain reason step check list table code run "
    "train token loss mask batch learning rate python function return error fix"
).split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(5, 15)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            messages += [
                {"role": "user", "content": text(8, 40)},
                {"role": "assistant", "content": text(20, 120)},
            ]
        rows.append({"messages": messages})
    return rows


def build_tokenizer(rows: list[dict], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        (m["content"] for r in rows[:2000] for m in r["messages"]), trainer=trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    return fast


def run_sftkit(
    path: Path, tok_dir: Path, workers: int, max_len: int, cache: Path
) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, prepared data) for the timed preparation."""
    from sftkit.config.derive import derive_config
    from sftkit.config.schema import MasterConfig
    from sftkit.data import load_tokenizer, prepare_data

    cfg = MasterConfig()
    cfg.policy.tokenizer.name = str(tok_dir)
    cfg.policy.max_total_sequence_length = max_len
    cfg.data.train = {"dataset_name": "openai_format", "data_path": str(path)}
    cfg.data.num_workers = workers
    cfg.data.cache_dir = str(cache)
    cfg = derive_config(cfg)
    start, cpu = time.perf_counter(), _cpu_seconds()
    tokenizer = load_tokenizer(cfg.policy)
    data = prepare_data(cfg, tokenizer)
    return time.perf_counter() - start, _cpu_seconds() - cpu, data


def run_trl(
    path: Path, tok_dir: Path, workers: int, max_len: int, cache: Path
) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, prepared data) for the timed preparation."""
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    args = SFTConfig(
        output_dir=str(cache / "out"),
        assistant_only_loss=True,
        max_length=max_len,
        dataset_num_proc=workers if workers > 1 else None,
        report_to=[],
        use_cpu=True,
    )
    tiny = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        ]
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer)
    start, cpu = time.perf_counter(), _cpu_seconds()
    raw = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(cache / "hf")
    )
    ds = trainer._prepare_dataset(raw, tokenizer, args, False, None, "train")
    return time.perf_counter() - start, _cpu_seconds() - cpu, ds


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pools)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def same_training_data(trl_ds: Any, data: Any) -> int:
    """Conversations where TRL and sftkit give the same ids and the same trained tokens."""
    same = 0
    for row, ex in zip(trl_ds, data.train, strict=True):
        trained = [i if m else -100 for i, m in zip(ex.input_ids, ex.loss_mask, strict=True)]
        same += row["input_ids"] == ex.input_ids and row["labels"] == trained
    return same


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=20_000, help="conversations")
    parser.add_argument("--workers", type=int, default=2, help="worker processes on both sides")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each with cold caches")
    parser.add_argument(
        "--tiny", action="store_true", help="300 conversations, 1 worker, 1 round (a smoke test)"
    )
    args = parser.parse_args(argv)
    num, workers, rounds = (300, 1, 1) if args.tiny else (args.num, args.workers, args.repeat)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    trl_s, ours_s, trl_cpu, ours_cpu, ratios = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = conversations(num)
        path = root / "conversations.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_tokenizer(rows, root / "tok")
        print(f"conversations={num} workers={workers} rounds={rounds}")
        for k in range(rounds):
            sides = [("trl", run_trl), ("sftkit", run_sftkit)]
            out = {}
            for name, run in sides if k % 2 == 0 else sides[::-1]:
                cache = root / f"{name}-{k}"  # a fresh directory: cold caches every round
                out[name] = run(path, root / "tok", workers, args.max_length, cache)
            (t_wall, t_cpu, trl_ds), (o_wall, o_cpu, data) = out["trl"], out["sftkit"]
            assert len(trl_ds) == len(data.train) == num, (len(trl_ds), len(data.train), num)
            trl_s.append(t_wall)
            ours_s.append(o_wall)
            trl_cpu.append(t_cpu)
            ours_cpu.append(o_cpu)
            ratios.append(t_wall / o_wall)
            print(
                f"round {k + 1}: TRL {num / t_wall:6.0f} samples/s ({t_wall:5.2f} s, "
                f"{t_cpu:5.1f} cpu-s)  sftkit {num / o_wall:6.0f} samples/s ({o_wall:5.2f} s, "
                f"{o_cpu:5.1f} cpu-s)  ratio {ratios[-1]:.2f}x"
            )
        same = same_training_data(trl_ds, data)
    report = data.report
    result = {
        "num": num,
        "workers": workers,
        "trl_samples_per_s": num / statistics.median(trl_s),
        "sftkit_samples_per_s": num / statistics.median(ours_s),
        "ratio": statistics.median(ratios),
        "cpu_ratio": statistics.median(t / o for t, o in zip(trl_cpu, ours_cpu, strict=True)),
        "identical": same,
        "span_fallbacks": report.get("train/span_fallbacks", 0),
        "offset_fallbacks": report.get("train/offset_fallbacks", 0),
    }
    print(f"TRL    {result['trl_samples_per_s']:10.0f} samples/s (median)")
    print(f"sftkit {result['sftkit_samples_per_s']:10.0f} samples/s (median)")
    print(f"ratio  {result['ratio']:10.2f}x (sftkit / TRL, median of rounds)")
    print(f"cpu    {result['cpu_ratio']:10.2f}x (TRL cpu-s / sftkit cpu-s, median)")
    print(f"same ids and trained tokens: {same}/{num} conversations")
    print(
        f"sftkit rows needing prefix renders: {result['span_fallbacks']}, "
        f"needing tokenizer offsets: {result['offset_fallbacks']}"
    )
    return result


if __name__ == "__main__":
    main()
