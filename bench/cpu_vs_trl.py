"""sftkit vs TRL's SFTTrainer on CPU: same tiny model, same data, one run (issue 7, bench c).

Model: a random-init Llama (hidden 128, 4 layers, 4 heads / 2 kv heads, intermediate 384,
vocab 2048), float32, SDPA attention. Data: variable-length chat-like examples whose lengths
follow bench/packing.py's `--tiny` distribution (lognormal, median 44 tokens, sigma 0.8,
clipped to [8, 256]); the first 30% of each example is an untrained prompt (labels -100).

Both sides run one epoch over the same examples, 32 examples per optimizer step, AdamW
(lr 1e-5, constant), grad-norm clipping at 1.0, the first step untimed (warm-up):

* TRL: `SFTTrainer` on the pre-tokenized dataset (`input_ids` + `labels` columns), its
  defaults otherwise (padding to the longest example of each micro-batch, no packing),
  micro-batch 8 x gradient accumulation 4, gradient checkpointing off (TRL's default is on:
  turning it off makes TRL faster, so the comparison is generous to TRL);
* sftkit: the training loop's own pieces: `micro_batches` (packed rows, MFFD, at most 8 x 256
  = 2048 tokens per micro-batch, the bound of TRL's micro-batch) and `train_step` (chunked
  head + loss on trained tokens, per-document attention).

Reported: real (non-pad) tokens/s of each side, their ratio (target >= 1.3), padding
fraction, and the mean loss over the measured steps (similar on both sides: a sanity check;
they differ a little because TRL shuffles the examples).

    uv run --group dev python bench/cpu_vs_trl.py              # 1 warm-up + 6 measured steps per side
    uv run --group dev python bench/cpu_vs_trl.py --tiny       # 1 + 2 (the tests run this)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not a package: reach bench/packing.py by path
    sys.path.insert(0, str(ROOT))

from bench.packing import TINY, make_examples, sample_lengths  # noqa: E402
from bench.results import emit  # noqa: E402

MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=True)  # fmt: skip
GLOBAL_BATCH = 32
MICRO_BATCH = 8
LR = 1e-5


def build_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def build_tokenizer() -> Any:
    """A word-level tokenizer over the model's vocabulary (TRL needs a processing class)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(MODEL["vocab_size"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def run_trl(examples: list[tuple[list[int], list[int]]], warmup: int) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    labels = [[t if m else -100 for t, m in zip(ids, mask, strict=True)] for ids, mask in examples]
    dataset = Dataset.from_dict({"input_ids": [ids for ids, _ in examples], "labels": labels})
    counts = {"real": 0, "processed": 0}
    marks: dict[str, Any] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                marks["start"] = (time.perf_counter(), dict(counts))
            marks["end"] = (time.perf_counter(), dict(counts))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs and state.global_step > warmup:
                losses.append(float(logs["loss"]))

    # transformers >= 5.2x renamed gradient_checkpointing (TRL's default: on) to
    # activation_checkpointing; set whichever exists, without the deprecation warning.
    ac = "activation_checkpointing"
    no_ac = {ac if ac in SFTConfig.__dataclass_fields__ else "gradient_checkpointing": False}
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=GLOBAL_BATCH // MICRO_BATCH, num_train_epochs=1,
            learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0,
            optim="adamw_torch", use_cpu=True, bf16=False, **no_ac,
            max_length=TINY.max_len, logging_steps=1, save_strategy="no", report_to="none",
            dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=build_model(), args=config, train_dataset=dataset,
            processing_class=build_tokenizer(), callbacks=[Clock()],
        )  # fmt: skip
        collate = trainer.data_collator

        def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collate(features)
            counts["real"] += int(batch["attention_mask"].sum())
            counts["processed"] += batch["input_ids"].numel()
            return batch

        trainer.data_collator = counting
        trainer.train()
    (t0, c0), (t1, c1) = marks["start"], marks["end"]
    real = c1["real"] - c0["real"]
    return {
        "side": "trl",
        "real_tokens_per_s": round(real / (t1 - t0), 1),
        "padding_fraction": round(1 - real / (c1["processed"] - c0["processed"]), 4),
        "mean_loss": round(sum(losses) / len(losses), 4) if losses else None,
        "seconds": round(t1 - t0, 3),
    }


def run_sftkit(examples: list[tuple[list[int], list[int]]], warmup: int) -> dict[str, Any]:
    from sftkit.data.loader import BatchPlan, micro_batches
    from sftkit.data.types import Example
    from sftkit.dist import DistEnv
    from sftkit.model.attention import enable_packed_attention
    from sftkit.train.step import StepOptions, train_step

    model = build_model()
    enable_packed_attention(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    plan = BatchPlan(micro_batch_size=MICRO_BATCH, pad_id=0, mode="packed",
                     mb_tokens=MICRO_BATCH * TINY.max_len, length_round=8)  # fmt: skip
    opts = StepOptions(compute_dtype=torch.float32, max_grad_norm=1.0, chunked_loss=True,
                       chunk_size=1024)  # fmt: skip
    env = DistEnv()
    rows = [Example(ids, mask, "bench") for ids, mask in examples]
    steps = [rows[i : i + GLOBAL_BATCH] for i in range(0, len(rows), GLOBAL_BATCH)]
    real = processed = 0
    losses = []
    start = 0.0
    for step, batch in enumerate(steps, 1):
        if step == warmup + 1:
            start = time.perf_counter()
        mbs = micro_batches(batch, plan)  # collation is timed, as it is inside TRL's loop
        loss = train_step(model, optimizer, mbs, sum(mb.num_target_tokens for mb in mbs),
                          opts, env, step)["loss"]  # fmt: skip
        if step > warmup:
            real += sum(len(e.input_ids) for e in batch)
            processed += sum(mb.input_ids.numel() for mb in mbs)
            losses.append(loss)
    seconds = time.perf_counter() - start
    return {
        "side": "sftkit",
        "real_tokens_per_s": round(real / seconds, 1),
        "padding_fraction": round(1 - real / processed, 4),
        "mean_loss": round(sum(losses) / len(losses), 4),
        "seconds": round(seconds, 3),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 measured steps instead of 6")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per side")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="append JSON lines here as each side ends")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, steps = 1, args.steps or (2 if args.tiny else 6)
    count = GLOBAL_BATCH * (warmup + steps)
    lengths = sample_lengths(TINY, count, args.seed)
    examples = make_examples(lengths, MODEL["vocab_size"], args.seed)
    records: list[dict[str, Any]] = [{
        "case": "setup", "examples": count, "global_batch": GLOBAL_BATCH, "warmup_steps": warmup,
        "measured_steps": steps, "mean_len": round(sum(lengths) / count, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }]  # fmt: skip
    emit(records[-1], args.out)
    for run in (run_trl, run_sftkit):
        records.append(run(examples, warmup))
        emit(records[-1], args.out)
    ratio = records[2]["real_tokens_per_s"] / records[1]["real_tokens_per_s"]
    records.append({"case": "summary", "sftkit_over_trl": round(ratio, 3),
                    "target_met": ratio >= 1.3})  # fmt: skip
    emit(records[-1], args.out)
    return records


if __name__ == "__main__":
    main()
