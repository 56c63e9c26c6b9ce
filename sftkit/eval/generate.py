"""Generation for eval: length-sorted batches, data-parallel ranks, a resumable JSONL stream.

Prompts are sorted by token length (longest first) and cut into batches of `batch_size`,
so a batch pads to its own longest prompt instead of the set's (on prompts whose lengths
spread over 10x, about half the time of unsorted batching: bench/eval_sorting.py).
Batch j goes to data-parallel rank j % world_size; the ranks' results are gathered and put
back in the prompts' order. Batches are fixed by the prompt set alone, and sampling is
seeded per batch, so one rank or several, interrupted or not, give the same generations.

Each finished batch is appended to a JSONL (`{"index": i, "samples": [...]}` a line, after
a header naming the run) and flushed; a rerun reads it and generates only the batches not
in it. When all are done the file is rewritten in prompt order, one line per prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sftkit.eval.config import GenerationSection

logger = logging.getLogger("sftkit")

STREAM_VERSION = 1


def batch_plan(lengths: list[int], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Prompt indices of every batch: longest first when `sort` (ties by index), else in order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if sort else list(
        range(len(lengths))
    )  # fmt: skip
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_batch(
    model: Any, tokenizer: Any, prompts: list[str], cfg: GenerationSection, n: int, limit: int
) -> list[list[str]]:
    """`n` completions for each of `prompts` in one `generate` call (greedy: one, repeated)."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    sampling = cfg.temperature > 0
    eos = [tokenizer.eos_token_id, *(cfg.stop_token_ids or [])]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    if limit and enc["input_ids"].shape[1] > limit:
        raise ValueError(
            f"a prompt has {enc['input_ids'].shape[1]} tokens, more than "
            f"data.max_input_seq_length={limit}; raise it or shorten the prompts."
        )
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(
        **enc,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sampling,
        temperature=cfg.temperature if sampling else None,
        top_p=cfg.top_p if sampling else None,
        top_k=(cfg.top_k if cfg.top_k > 0 else 0) if sampling else None,
        num_return_sequences=n if sampling else 1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[i for i in eos if i is not None],
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    texts = [cut_at_stop(t, cfg.stop_strings) for t in texts]
    per = n if sampling else 1
    groups = [texts[k * per : (k + 1) * per] for k in range(len(prompts))]
    return groups if sampling else [g * n for g in groups]  # greedy samples are identical


def cut_at_stop(text: str, stops: list[str] | None) -> str:
    for stop in stops or []:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


# -- the stream -----------------------------------------------------------------------------
class GenerationStream:
    """The JSONL of finished generations: read on start (resume), appended per batch.

    With several ranks each appends to its own `<path>.rank<r>` (no interleaved writes);
    rank 0 merges them into `<path>` at the end. A header line holds `fingerprint` (model,
    data, sampling): a file from another run is refused instead of mixed in.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any], rank: int = 0, world: int = 1):
        self.path, self.fingerprint, self.rank = path, fingerprint, rank
        self.own = path if world == 1 else path.with_name(f"{path.name}.rank{rank}")

    def header(self) -> str:
        return json.dumps({"sftkit_eval_stream": STREAM_VERSION, "fingerprint": self.fingerprint})

    def done(self) -> dict[int, list[str]]:
        """Generations already in the stream files (any rank's, of any earlier world size)."""
        found: dict[int, list[str]] = {}
        files = [self.path, *sorted(self.path.parent.glob(f"{self.path.name}.rank*"))]
        for file in (f for f in files if f.is_file()):
            found.update(self._read(file))
        return found

    def _read(self, file: Path) -> dict[int, list[str]]:
        lines = file.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if len(lines) <= 1 and not header:  # killed while writing its header: start it again
            file.unlink()
            return {}
        if header.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{file} holds generations of another eval run (its header: {lines[0][:200]}); "
                "delete it to start over, or set eval.generations_path to another file."
            )
        rows: dict[int, list[str]] = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run, cut mid-write
                continue
            rows[int(row["index"])] = list(row["samples"])
        return rows

    def append(self, rows: Iterable[tuple[int, list[str]]]) -> None:
        """Append one batch's rows and flush them to disk before the next batch starts."""
        self.own.parent.mkdir(parents=True, exist_ok=True)
        size = self.own.stat().st_size if self.own.is_file() else 0
        with self.own.open("a+b") as f:
            if size:  # a line cut by a kill stays alone on its line (it is skipped on read)
                f.seek(size - 1)
                lead = b"" if f.read(1) == b"\n" else b"\n"
            else:
                lead = self.header().encode() + b"\n"
            text = "".join(json.dumps({"index": i, "samples": s}) + "\n" for i, s in rows)
            f.write(lead + text.encode())
            f.flush()

    def finish(self, rows: dict[int, list[str]]) -> None:
        """Rank 0: the whole stream in prompt order, one line per prompt; rank files removed."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        text = "".join(json.dumps({"index": i, "samples": rows[i]}) + "\n" for i in sorted(rows))
        tmp.write_text(self.header() + "\n" + text)
        tmp.replace(self.path)
        for shard in self.path.parent.glob(f"{self.path.name}.rank*"):
            shard.unlink()


# -- the pass -----------------------------------------------------------------------------
def generate_all(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: GenerationSection,
    n: int,
    limit: int,
    *,
    seed: int = 0,
    sort: bool = True,
    stream: GenerationStream | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[list[str]]:
    """`n` completions per prompt, in the prompts' order, on every rank (gathered)."""
    from sftkit.log.progress import Progress

    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    plan = batch_plan(lengths, cfg.batch_size, sort)
    results = stream.done() if stream else {}
    if results:
        logger.info("resuming: %d of %d prompts already generated", len(results), len(prompts))
    mine = [(j, b) for j, b in enumerate(plan) if j % world == rank]
    todo = [(j, b) for j, b in mine if any(i not in results for i in b)]
    progress = Progress("generating", len(todo), "batch", enabled=rank == 0)
    for j, batch in todo:
        if cfg.temperature > 0:  # per batch: a resumed or sharded run draws the same samples
            torch.manual_seed(seed * 1_000_003 + j)
        groups = generate_batch(model, tokenizer, [prompts[i] for i in batch], cfg, n, limit)
        fresh = [(i, g) for i, g in zip(batch, groups, strict=True) if i not in results]
        results.update(fresh)
        if stream:
            stream.append(fresh)
        progress.update(1)
    progress.close()
    if world > 1:
        results = _gather(results, world)
    if stream and rank == 0:
        stream.finish(results)
    missing = [i for i in range(len(prompts)) if i not in results]
    assert not missing, f"prompts {missing[:5]} were generated by no rank"
    return [results[i] for i in range(len(prompts))]


def _gather(results: dict[int, list[str]], world: int) -> dict[int, list[str]]:
    import torch.distributed as dist

    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, results)
    merged: dict[int, list[str]] = {}
    for share in shares:
        merged.update(share)
    return merged
