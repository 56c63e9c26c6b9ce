"""`prepare_data`: dataset configs in, tokenized train/validation examples out.

Rows are tokenized in `data.num_workers` processes (chunks in order, so results do not
depend on the worker count) and cached on disk (see `sftkit.data.cache`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftkit.data import cache
from sftkit.data.datasets import load_dataset, rows_of
from sftkit.data.processor import Outcome, Processor, ProcessorSettings
from sftkit.data.types import Example, PreparedData

logger = logging.getLogger("sftkit")

Item = tuple[dict[str, Any], str]  # (row, task_name)
DROP_CODES = {None: 0, "overlong": 1, "untrainable": 2}


def prepare_data(cfg: Any, tokenizer: Any) -> PreparedData:
    """Load the configured datasets, tokenize and mask them, and apply the length policy.

    Validation = the held-out parts of the training datasets (`split_validation_size`)
    plus the `data.validation` datasets. Max length = `data.max_input_seq_length` or
    `policy.max_total_sequence_length`.
    """
    settings = settings_from_config(cfg)
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
        overlong_policy=policy,
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
        for split, items in splits.items():
            packed, tasks = _run(items, tokenizer, settings, workers)
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
    logger.info(
        "data ready in %.1fs (%s): %s",
        time.perf_counter() - start,
        "cache" if hit is not None else f"{workers} worker(s)",
        ", ".join(f"{k}={v}" for k, v in result.report.items()),
    )
    return result


# -- workers ---------------------------------------------------------------------------
_PROCESSOR: Processor | None = None


def _init_worker(tokenizer: Any, settings: ProcessorSettings) -> None:
    global _PROCESSOR
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _PROCESSOR = Processor(tokenizer, settings)


def _work(
    chunk: Sequence[Item],
) -> list[tuple[list[int] | None, list[int] | None, int, bool, bool, str]]:
    assert _PROCESSOR is not None
    return [_pack_outcome(_PROCESSOR.process(row, task), task) for row, task in chunk]


def _pack_outcome(
    o: Outcome, task: str
) -> tuple[list[int] | None, list[int] | None, int, bool, bool, str]:
    ex = o.example
    if ex is None:
        return None, None, DROP_CODES[o.dropped], False, False, task
    return ex.input_ids, ex.loss_mask, 0, ex.truncated, o.masked, task


def _run(
    items: list[Item], tokenizer: Any, settings: ProcessorSettings, workers: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    workers = min(workers, os.cpu_count() or 1, max(1, len(items) // 64))
    if workers <= 1:
        processor = Processor(tokenizer, settings)
        results = [_pack_outcome(processor.process(row, task), task) for row, task in items]
    else:
        size = max(16, len(items) // (workers * 8))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        # fork shares the loaded tokenizer for free; spawn re-imports (macOS, Windows)
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, settings)) as pool:
            results = [r for part in pool.imap(_work, chunks) for r in part]
    return _pack(results)


def _pack(results: list[tuple[Any, ...]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    names: list[str] = []
    index: dict[str, int] = {}
    ids: list[int] = []
    mask: list[int] = []
    lengths, task_ix, truncated, drops, masked = [], [], [], [], []
    for ex_ids, ex_mask, drop, trunc, was_masked, task in results:
        drops.append(drop)
        masked.append(was_masked)
        if ex_ids is None:
            continue
        ids += ex_ids
        mask += ex_mask
        lengths.append(len(ex_ids))
        task_ix.append(index.setdefault(task, len(index)))
        truncated.append(trunc)
    names = list(index)
    arrays = {
        "ids": np.asarray(ids, dtype=np.int64),
        "mask": np.asarray(mask, dtype=np.uint8),
        "lengths": np.asarray(lengths, dtype=np.int64),
        "task": np.asarray(task_ix, dtype=np.int32),
        "truncated": np.asarray(truncated, dtype=bool),
    }
    drops_a = np.asarray(drops, dtype=np.int8)
    counts = {
        "rows": len(results),
        "dropped_overlong": int((drops_a == 1).sum()),
        "dropped_untrainable": int((drops_a == 2).sum()),
        "masked_overlong": int(sum(masked)),
    }
    return arrays, {"names": names, "counts": counts}


def _unpack(
    arrays: dict[str, np.ndarray], tasks: dict[str, Any], split: str
) -> tuple[list[Example], dict[str, int]]:
    ids, mask = arrays[f"{split}/ids"].tolist(), arrays[f"{split}/mask"].tolist()
    lengths = arrays[f"{split}/lengths"].tolist()
    task_ix, truncated = arrays[f"{split}/task"].tolist(), arrays[f"{split}/truncated"].tolist()
    names = tasks["names"]
    examples, pos = [], 0
    for n, t, tr in zip(lengths, task_ix, truncated, strict=True):
        examples.append(Example(ids[pos : pos + n], mask[pos : pos + n], names[t], bool(tr)))
        pos += n
    counts = {f"{split}/{k}": int(v) for k, v in tasks["counts"].items()}
    counts[f"{split}/examples"] = len(examples)
    counts[f"{split}/truncated"] = int(sum(truncated))
    counts[f"{split}/tokens"] = len(ids)
    counts[f"{split}/trained_tokens"] = int(arrays[f"{split}/mask"].sum())
    return examples, counts


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
