"""`prepare_data`: dataset configs in, tokenized train/validation examples out.

Rows are tokenized in `data.num_workers` processes (chunks in order, so results do not
depend on the worker count) and cached on disk (see `sftkit.data.cache`).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

from sftkit.data import cache
from sftkit.data.datasets import load_dataset, rows_of
from sftkit.data.processor import BatchResult, OverlongPolicy, Processor, ProcessorSettings
from sftkit.data.types import Example, PreparedData

logger = logging.getLogger("sftkit")

Item = tuple[dict[str, Any], str]  # (row, task_name)
CHUNK_MAX = 1024  # rows per worker task


def prepare_data(cfg: Any, tokenizer: Any) -> PreparedData:
    """Load the configured datasets, tokenize and mask them, and apply the length policy.

    Validation = the held-out parts of the training datasets (`split_validation_size`)
    plus the `data.validation` datasets. Max length = `data.max_input_seq_length` or
    `policy.max_total_sequence_length`.
    """
    settings = settings_from_config(cfg)
    with _gc_paused():  # rows are plain data without cycles; collections only cost time
        splits = collect_items(cfg)
    if not splits["train"]:
        raise ValueError("data.train produced no rows. Check data.train (or data.dataset_name).")
    data_cfg = cfg.data
    workers = max(1, int(getattr(data_cfg, "num_workers", 1) or 1))
    cache_dir = getattr(data_cfg, "cache_dir", None)
    return tokenize_splits(
        splits,
        tokenizer,
        settings,
        workers,
        Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir(),
    )


def settings_from_config(cfg: Any) -> ProcessorSettings:
    data = cfg.data
    max_len = getattr(data, "max_input_seq_length", None) or cfg.policy.max_total_sequence_length
    tok_cfg = getattr(cfg.policy, "tokenizer", None)
    kwargs = _plain(getattr(tok_cfg, "chat_template_kwargs", None)) or {}
    policy = getattr(data, "overlong_policy", "truncate")
    if policy not in ("truncate", "drop", "mask"):
        raise ValueError(f"data.overlong_policy={policy!r}: use truncate, drop or mask.")
    return ProcessorSettings(
        max_length=int(max_len),
        overlong_policy=cast(OverlongPolicy, policy),  # checked just above
        add_bos=bool(getattr(data, "add_bos", True)),
        add_eos=bool(getattr(data, "add_eos", True)),
        only_unmask_final=bool(getattr(getattr(cfg, "sft", None), "only_unmask_final", False)),
        drop_untrainable=bool(getattr(data, "drop_untrainable", False)),
        template_kwargs=dict(kwargs),
    )


def dataset_entries(cfg: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train entries, validation entries) with `data.default` merged into each."""
    data = cfg.data
    default = _plain(getattr(data, "default", None)) or {}
    train = _as_list(_plain(getattr(data, "train", None)))
    if not train and getattr(data, "dataset_name", None):  # the seed's flat form
        extra = _plain(getattr(data, "extra", None)) or {}
        train = [{"dataset_name": data.dataset_name, **extra}]
    validation = _as_list(_plain(getattr(data, "validation", None)))
    return [{**default, **e} for e in train], [{**default, **e} for e in validation]


def collect_items(cfg: Any) -> dict[str, list[Item]]:
    """Rows (with task spec applied) for each split."""
    train_entries, val_entries = dataset_entries(cfg)
    out: dict[str, list[Item]] = {"train": [], "validation": []}
    for entry in train_entries:
        ds = load_dataset(entry)
        out["train"] += _items(ds, rows_of(ds, "train"))
        out["validation"] += _items(ds, rows_of(ds, "validation"))
    for entry in val_entries:
        ds = load_dataset(entry)
        out["validation"] += _items(ds, rows_of(ds, "validation") or rows_of(ds, "train"))
    return out


def tokenize_splits(
    splits: dict[str, list[Item]],
    tokenizer: Any,
    settings: ProcessorSettings,
    workers: int = 1,
    cache_dir: Path | None = None,
) -> PreparedData:
    """Tokenize each split (through the cache when `cache_dir` is given)."""
    key = cache.cache_key(splits, tokenizer, settings) if cache_dir else ""
    path = cache_dir / f"{key}.npz" if cache_dir else None
    hit = cache.load(path) if path else None
    start = time.perf_counter()
    if hit is not None:
        arrays, meta = hit
    else:
        Processor(tokenizer, settings)  # fail fast on tokenizer/template problems, in-process
        arrays, meta = {}, {"report": {}, "tasks": {}}
        for split, (packed, tasks) in _run(splits, tokenizer, settings, workers).items():
            arrays.update({f"{split}/{k}": v for k, v in packed.items()})
            meta["tasks"][split] = tasks
        if path:
            cache.save(path, arrays, meta)
    result = PreparedData([], [], {"cache_hit": int(hit is not None)})
    for split in splits:
        examples, counts = _unpack(arrays, meta["tasks"][split], split)
        if split == "train" and not examples:
            raise ValueError(
                f"no training examples remain after the length policy ({counts}). Raise "
                "data.max_input_seq_length, or use data.overlong_policy: truncate."
            )
        setattr(result, split, examples)
        result.report.update(counts)
        _warn_overlong(split, counts, settings)
    logger.info(
        "data ready in %.1fs (%s): %s",
        time.perf_counter() - start,
        "cache" if hit is not None else f"{workers} worker(s)",
        ", ".join(f"{k}={v}" for k, v in result.report.items()),
    )
    return result


def _length_p99(results: list[BatchResult]) -> int:
    """The smallest length at which at least 99% of the rows fit (tokens before the policy)."""
    full = [r.full_lengths for r in results if r.full_lengths is not None]
    lengths = np.sort(np.concatenate(full)) if full else np.zeros(0, dtype=np.int64)
    if not len(lengths):
        return 0
    return int(lengths[-(-99 * len(lengths) // 100) - 1])


def _warn_overlong(split: str, counts: dict[str, int], settings: ProcessorSettings) -> None:
    """Loud when more than 1% of a split's rows exceed the length limit."""
    rows = counts.get(f"{split}/rows", 0)
    over = sum(
        counts.get(f"{split}/{k}", 0) for k in ("truncated", "dropped_overlong", "masked_overlong")
    )
    if not rows or over * 100 <= rows:
        return
    action = {"truncate": "truncated", "drop": "dropped", "mask": "masked (not trained)"}
    fit = counts.get(f"{split}/length_p99", 0)
    logger.warning(
        "%s: %d of %d rows (%.1f%%) are longer than %d tokens and were %s; "
        "policy.max_total_sequence_length=%s would fit at least 99%% of them.",
        split, over, rows, 100 * over / rows, settings.max_length,
        action[settings.overlong_policy], fit or "?",
    )  # fmt: skip


# -- workers ---------------------------------------------------------------------------
_PROCESSOR: Processor | None = None
_ITEMS: list[Item] = []  # the rows, inherited by forked workers instead of pickled to them
# (start, stop, index of `start` within its split, the rows when not forked)
Task = tuple[int, int, int, list[Item] | None]


def _init_worker(tokenizer: Any, settings: ProcessorSettings) -> None:
    global _PROCESSOR
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    gc.freeze()  # inherited rows are never garbage: keep collections from walking them
    _PROCESSOR = Processor(tokenizer, settings)


def _work(task: Task) -> BatchResult:
    assert _PROCESSOR is not None
    start, stop, first, rows = task
    chunk = _ITEMS[start:stop] if rows is None else rows
    return _PROCESSOR.process_batch([r for r, _ in chunk], _wheres(first, stop - start))


def _wheres(first: int, n: int) -> list[str]:
    """Row labels for errors, used when a reader did not record the row's origin."""
    return [f"row {k}" for k in range(first, first + n)]


def _run(
    splits: dict[str, list[Item]], tokenizer: Any, settings: ProcessorSettings, workers: int
) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """Process every split, in one pool of `workers` processes when there is enough work."""
    global _ITEMS
    names = list(splits)
    items = [item for name in names for item in splits[name]]
    offsets = np.cumsum([0] + [len(splits[name]) for name in names]).tolist()
    workers = min(workers, os.cpu_count() or 1, max(1, len(items) // 64))
    # chunks never straddle two splits; ~16 per worker keep the last one from finishing
    # long after the others; the cap bounds a worker's memory
    size = min(max(16, -(-len(items) // (workers * 16))), CHUNK_MAX)
    bounds = [
        (i, min(i + size, hi), i - lo)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
        for i in range(lo, hi, size)
    ]
    if workers <= 1:
        processor = Processor(tokenizer, settings)
        results = [
            processor.process_batch([r for r, _ in items[a:b]], _wheres(first, b - a))
            for a, b, first in bounds
        ]
    else:
        fork = sys.platform == "linux"  # fork shares the rows and the tokenizer for free
        ctx = mp.get_context("fork" if fork else "spawn")
        tasks: list[Task] = [(a, b, k, None if fork else items[a:b]) for a, b, k in bounds]
        _ITEMS = items if fork else []
        try:
            with ctx.Pool(
                workers, initializer=_init_worker, initargs=(tokenizer, settings)
            ) as pool:
                results = list(pool.imap(_work, tasks))
        finally:
            _ITEMS = []
    out = {}
    for name, lo, hi in zip(names, offsets[:-1], offsets[1:], strict=True):
        mine = [r for (a, _, _), r in zip(bounds, results, strict=True) if lo <= a < hi]
        out[name] = _pack(mine, [task for _, task in items[lo:hi]])
    return out


def _pack(
    results: list[BatchResult], tasks: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not results:  # an empty split
        results = [BatchResult.empty()]
    lengths = np.concatenate([r.lengths for r in results])
    drops = np.concatenate([r.drops for r in results])
    kept = drops == 0
    index: dict[str, int] = {}
    task_ix = np.asarray([index.setdefault(t, len(index)) for t in tasks], dtype=np.int32)
    arrays = {
        "ids": np.concatenate([r.ids for r in results]),
        "mask": np.concatenate([r.mask for r in results]),
        "lengths": lengths[kept],
        "task": task_ix[kept],
        "truncated": np.concatenate([r.truncated for r in results])[kept],
    }
    paths = {"span_fallbacks": 0, "offset_fallbacks": 0}
    for r in results:
        for k, v in r.paths.items():
            paths[k] = paths.get(k, 0) + v
    counts = {
        "rows": int(len(drops)),
        "dropped_overlong": int((drops == 1).sum()),
        "dropped_untrainable": int((drops == 2).sum()),
        "masked_overlong": int(np.concatenate([r.masked for r in results]).sum()),
        "length_p99": _length_p99(results),
        **paths,  # rows that needed the prefix renders / the tokenizer's offsets
    }
    return arrays, {"names": list(index), "counts": counts}


def _unpack(
    arrays: dict[str, np.ndarray], tasks: dict[str, Any], split: str
) -> tuple[list[Example], dict[str, int]]:
    with _gc_paused():  # millions of new ints and lists: collections would only slow it down
        ids, mask = arrays[f"{split}/ids"].tolist(), arrays[f"{split}/mask"].tolist()
        lengths = arrays[f"{split}/lengths"].tolist()
        task_ix = arrays[f"{split}/task"].tolist()
        truncated = arrays[f"{split}/truncated"].tolist()
        names = tasks["names"]
        examples, pos = [], 0
        for n, t, tr in zip(lengths, task_ix, truncated, strict=True):
            examples.append(Example(ids[pos : pos + n], mask[pos : pos + n], names[t], tr))
            pos += n
    counts = {f"{split}/{k}": int(v) for k, v in tasks["counts"].items()}
    counts[f"{split}/examples"] = len(examples)
    counts[f"{split}/truncated"] = int(sum(truncated))
    counts[f"{split}/tokens"] = len(ids)
    counts[f"{split}/trained_tokens"] = int(arrays[f"{split}/mask"].sum())
    return examples, counts


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- config helpers --------------------------------------------------------------------
def _items(dataset: Any, rows: list[dict[str, Any]]) -> list[Item]:
    spec = dataset.task_spec
    apply = getattr(spec, "apply", None)
    return [(apply(row) if apply else row, spec.task_name) for row in rows]


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain dicts/lists; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _as_list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return list(value)
    raise ValueError(
        f"data.train/data.validation must be a dataset mapping or a list of them, got {value!r}."
    )
