"""`prepare_data`: dataset configs in, tokenized train/validation examples out.

Rows stream from the readers in chunks: one pass hashes them into the cache key (see
`sftkit.data.cache`); on a miss a second pass tokenizes the chunks in `data.num_workers`
processes (in order, so results do not depend on the worker count) and appends them to
the cache entry's files. The result memory-maps that entry, so the process holds a few
chunks of rows at a time, never the dataset.
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sftkit.config.checks import default_name
from sftkit.config.schema import DataConfig, MasterConfig, PolicyConfig
from sftkit.data import cache
from sftkit.data.datasets import has_split, iter_rows, load_dataset
from sftkit.data.errors import DataError
from sftkit.data.once import PrepareGroup
from sftkit.data.processor import (
    BatchResult,
    OverlongPolicy,
    Processor,
    ProcessorSettings,
)
from sftkit.data.types import PreparedData
from sftkit.log.progress import Progress

if TYPE_CHECKING:
    from sftkit.dist import DistEnv

logger = logging.getLogger("sftkit")

Item = tuple[dict[str, Any], str]  # (row, task_name)
CHUNK_MAX = 1024  # rows per worker task: bounds a worker's (and the queue's) memory
HASH_CHUNK = 1024  # rows per hash update (fixed: the key must not depend on workers)
SPLITS = ("train", "validation")


@dataclass
class Entry:
    """One configured dataset: its name, sampling weight and dataset config."""

    name: str
    weight: float | None
    config: dict[str, Any]


@dataclass
class Part:
    """One named dataset's rows for one split: `split` is the `formatted_ds` key to read."""

    name: str
    dataset: Any
    split: str

    def items(self) -> Iterator[Item]:
        spec = self.dataset.task_spec
        apply = getattr(spec, "apply", None)  # drop-in task specs may have none
        for row in iter_rows(self.dataset, self.split):
            yield (apply(row) if apply else row, spec.task_name)


def prepare_data(cfg: MasterConfig, tokenizer: Any, env: DistEnv | None = None) -> PreparedData:
    """Load the configured datasets, tokenize and mask them, and apply the length policy.

    Validation = the held-out parts of the training datasets (`split_validation_size`,
    named after their train entry) plus the `data.validation` datasets, one named set
    each. Max length = `data.max_input_seq_length` (derived at load from
    `policy.max_total_sequence_length` when unset). With several ranks (`env`), one process
    per node or per run (`data.cache_scope`) reads and tokenizes; the others wait for its
    cache entry and map it (`sftkit.data.once`).
    """
    data = cfg.data
    start = time.perf_counter()
    settings = settings_from_config(data, cfg.policy, cfg.sft.only_unmask_final)
    train, validation = dataset_entries(data)
    cache_dir = _cache_dir(data.cache_dir)
    group = PrepareGroup.of(env, data.cache_scope, data.prepare_timeout_s)
    progress = env is None or env.is_main
    if group is not None and not group.preparer:
        key = group.wait()
        directory, meta = _open_checked(cache_dir / key, len(tokenizer))
        how = f"prepared by {group.who}"
    else:
        workers = max(1, data.num_workers)
        try:
            parts = collect_parts(train, validation)
            directory, meta, hit = _entry(parts, tokenizer, settings, workers, cache_dir, progress)
        except Exception as err:
            if group is not None:
                group.failed(err)
            raise
        if group is not None:
            group.done(directory.name)
        how = "from the cache" if hit else f"{workers} worker(s)"
    result = _result(directory, meta, settings, hit=how == "from the cache")
    result.train = result.train.with_weights({e.name: e.weight for e in train})
    logger.info(
        "data ready in %.1fs (%s): %s",
        time.perf_counter() - start, how, describe_report(result.report),
    )  # fmt: skip
    return result


def _cache_dir(setting: str | None) -> Path:
    """The cache directory, checked before the hashing pass (minutes on large data)."""
    where = f"data.cache_dir={setting!r}" if setting else "the default data.cache_dir"
    path = Path(setting).expanduser() if setting else cache.default_cache_dir()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where} is a file, not a directory; point data.cache_dir at one.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{where}: cannot create {path} ({exc.strerror}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: {path} is not writable; choose another data.cache_dir.")
    return path


def settings_from_config(
    data: DataConfig, policy: PolicyConfig, only_unmask_final: bool = False
) -> ProcessorSettings:
    assert data.max_input_seq_length is not None and data.max_row_chars is not None, (
        "data.max_input_seq_length / max_row_chars are derived at load: pass a config built "
        "in code through sftkit.config.derive.derive_config"
    )
    max_len = data.max_input_seq_length
    kwargs = _plain(policy.tokenizer.chat_template_kwargs) or {}
    if data.overlong_policy not in ("truncate", "drop", "mask"):
        raise ValueError(
            f"data.overlong_policy={data.overlong_policy!r}: use truncate, drop or mask."
        )
    max_chars = data.max_row_chars
    if max_chars < 1:
        raise ValueError(f"data.max_row_chars={max_chars}: use a positive number, or null.")
    return ProcessorSettings(
        max_length=int(max_len),
        overlong_policy=cast(OverlongPolicy, data.overlong_policy),  # checked just above
        add_bos=data.add_bos,
        add_eos=data.add_eos,
        only_unmask_final=only_unmask_final,
        drop_untrainable=data.drop_untrainable,
        template_kwargs=dict(kwargs),
        max_row_chars=int(max_chars),
        reasoning=data.reasoning,
        loss_mask=data.loss_mask,
        add_generation_prompt=data.add_generation_prompt,
    )


def dataset_entries(data: DataConfig) -> tuple[list[Entry], list[Entry]]:
    """(train entries, validation entries), named, with `data.default` merged into each."""
    default = _plain(data.default) or {}
    train = _as_list(_plain(data.train))
    if not train and data.dataset_name:  # the seed's flat form
        train = [{"dataset_name": data.dataset_name, **(_plain(data.extra) or {})}]
    validation = _as_list(_plain(data.validation))
    return (
        _named([{**default, **e} for e in train]),
        _named([{**default, **e} for e in validation]),
    )


def _named(entries: list[dict[str, Any]]) -> list[Entry]:
    """Entries with `name` and `weight` taken out (checked at load: `config/checks.py`)."""
    out: list[Entry] = []
    for raw in entries:
        config = dict(raw)
        name = config.pop("name", None) or default_name(config)
        weight = config.pop("weight", None)
        out.append(Entry(name, None if weight is None else float(weight), config))
    return out


def collect_parts(train: list[Entry], validation: list[Entry]) -> dict[str, list[Part]]:
    """Each split's named parts; a held-out split carries its train entry's name."""
    parts: dict[str, list[Part]] = {"train": [], "validation": []}
    owners: dict[str, str] = {}

    def add_validation(part: Part, owner: str) -> None:
        if part.name in owners:
            raise ValueError(
                f"two validation sets are named {part.name!r} ({owners[part.name]} and "
                f"{owner}); set `name` on one of them."
            )
        owners[part.name] = owner
        parts["validation"].append(part)

    for k, entry in enumerate(train):
        ds = load_dataset(entry.config)
        parts["train"].append(Part(entry.name, ds, "train"))
        if has_split(ds, "validation"):
            add_validation(Part(entry.name, ds, "validation"), f"data.train[{k}]'s split")
    for k, entry in enumerate(validation):
        ds = load_dataset(entry.config)
        split = "validation" if has_split(ds, "validation") else "train"
        add_validation(Part(entry.name, ds, split), f"data.validation[{k}]")
    return parts


def first_items(data: DataConfig, split: str, num: int) -> list[Item]:
    """The first `num` rows of a split (for previews), reading no further."""
    parts = collect_parts(*dataset_entries(data))[split]
    return list(itertools.islice(itertools.chain.from_iterable(p.items() for p in parts), num))


def tokenize_splits(
    parts: dict[str, list[Part]],
    tokenizer: Any,
    settings: ProcessorSettings,
    workers: int,
    cache_dir: Path,
) -> PreparedData:
    """Tokenize each split through the cache (this process alone); the result maps the
    cache entry."""
    directory, meta, hit = _entry(parts, tokenizer, settings, workers, cache_dir, True)
    return _result(directory, meta, settings, hit)


def _entry(
    parts: dict[str, list[Part]],
    tokenizer: Any,
    settings: ProcessorSettings,
    workers: int,
    cache_dir: Path,
    progress: bool,
) -> tuple[Path, dict[str, Any], bool]:
    """(the cache entry, its metadata, whether it was there): found and checked, or built."""
    with _gc_paused():  # rows are plain data without cycles; collections only cost time
        key, rows = _key(parts, tokenizer, settings, progress)
    if not rows["train"]:
        raise ValueError("data.train produced no rows. Check data.train (or data.dataset_name).")
    directory = cache_dir / key
    cache.remove_abandoned(cache_dir)  # temp entries of killed builds
    with cache.node_lock(cache_dir, key):  # one process per node checks or builds the entry
        meta = cache.read_meta(directory)
        problem = meta and cache.entry_problem(directory, meta, SPLITS, len(tokenizer), progress)
        if meta is not None and problem:
            logger.warning("data cache entry %s is damaged: %s; rebuilding it", directory, problem)
            cache.discard(directory)
            meta = None
        hit = meta is not None
        if meta is None:
            Processor(tokenizer, settings)  # fail fast on tokenizer/template problems
            total = sum(rows.values())
            meta = _build(parts, tokenizer, settings, workers, cache_dir, key, total, progress)
            meta = cache.read_meta(directory) or meta  # another node may have published first
            problem = cache.entry_problem(directory, meta, SPLITS, len(tokenizer), progress)
            if problem:  # a bug in this build, or a disk that loses writes
                raise DataError(str(directory), f"the entry just built is damaged: {problem}.")
    return directory, meta, hit


def _open_checked(directory: Path, vocab_size: int) -> tuple[Path, dict[str, Any]]:
    """The entry another process prepared: sizes checked, and its checksums where this is
    the first process of its node to open it (`cache.entry_problem`, under the node lock)."""
    with cache.node_lock(directory.parent, directory.name):
        meta = cache.read_meta(directory)
        problem = "meta.json is missing or unreadable" if meta is None else None
        problem = problem or cache.entry_problem(directory, meta or {}, SPLITS, vocab_size)
        if problem:
            cache.discard(directory)  # the next start prepares it again
            raise DataError(
                str(directory), f"the prepared data cannot be used: {problem}.",
                "start the run again; the entry was removed and will be rebuilt.",
            )  # fmt: skip
    assert meta is not None
    return directory, meta


def _result(
    directory: Path, meta: dict[str, Any], settings: ProcessorSettings, hit: bool
) -> PreparedData:
    """The mapped splits of entry `directory` with its report; warnings for what it dropped."""
    sets = {split: cache.open_split(directory, split, meta[split]) for split in SPLITS}
    result = PreparedData(sets["train"], sets["validation"], {"cache_hit": int(hit)})
    for split in SPLITS:
        info = meta[split]
        result.report.update({f"{split}/{k}": int(v) for k, v in info["counts"].items()})
        result.report.update(
            {f"{split}/examples": info["examples"], f"{split}/tokens": info["tokens"],
             f"{split}/trained_tokens": info["trained_tokens"]}
        )  # fmt: skip
        if info["counts"]["dropped_oversize"]:
            logger.warning(
                "%s: dropped %d row(s) longer than data.max_row_chars=%d characters (first: "
                "%s); raise data.max_row_chars to keep them",
                split, info["counts"]["dropped_oversize"], settings.max_row_chars,
                info["oversize"][0] if info["oversize"] else "?",
            )  # fmt: skip
        _warn_overlong(split, info["counts"], settings)
    if not len(result.train):
        counts = {k: v for k, v in result.report.items() if k.startswith("train/")}
        raise ValueError(
            f"no training examples remain after the length policy ({counts}). Raise "
            "data.max_input_seq_length, or use data.overlong_policy: truncate."
        )
    return result


# The data report's counters as a person reads them (README, "What the data line says").
COUNTER_NAMES = {
    "dropped_overlong": "dropped as too long",
    "masked_overlong": "kept untrained as too long",
    "truncated": "truncated to the length limit",
    "dropped_untrainable": "dropped with no trained token",
    "dropped_oversize": "dropped over data.max_row_chars",
    "span_fallbacks": "answers located by prefix renders (slower)",
    "offset_fallbacks": "tokenized on the slower offset path",
}


def describe_report(report: dict[str, int]) -> str:
    """One line for the data report: per split its examples and tokens, then only the
    counters that are not zero, named as the README explains them."""
    parts = []
    for split in SPLITS:
        counts = {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith(split + "/")}
        get = counts.get
        if not get("rows"):
            continue
        text = (
            f"{split} {get('examples', 0):,} examples of {get('rows', 0):,} rows, "
            f"{get('tokens', 0):,} tokens ({get('trained_tokens', 0):,} trained), "
            f"99% <= {get('length_p99', 0):,} tokens"
        )
        named = [f"{counts[key]:,} {name}" for key, name in COUNTER_NAMES.items() if get(key)]
        parts.append(text + "".join(f", {c}" for c in named))
    return "; ".join(parts) or "no rows"


def _warn_overlong(split: str, counts: dict[str, int], settings: ProcessorSettings) -> None:
    """Loud when more than 1% of a split's rows exceed the length limit."""
    rows = counts.get("rows", 0)
    over = sum(counts.get(k, 0) for k in ("truncated", "dropped_overlong", "masked_overlong"))
    if not rows or over * 100 <= rows:
        return
    action = {"truncate": "truncated", "drop": "dropped", "mask": "masked (not trained)"}
    fit = counts.get("length_p99", 0)
    logger.warning(
        "%s: %d of %d rows (%.1f%%) are longer than %d tokens and were %s; "
        "policy.max_total_sequence_length=%s would fit at least 99%% of them.",
        split, over, rows, 100 * over / rows, settings.max_length,
        action[settings.overlong_policy], fit or "?",
    )  # fmt: skip


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _key(
    parts: dict[str, list[Part]], tokenizer: Any, settings: ProcessorSettings, progress: bool
) -> tuple[str, dict[str, int]]:
    """The cache key (one streaming pass over every row) and the row count per split."""
    h = cache.key_hasher(tokenizer, settings)
    rows = dict.fromkeys(SPLITS, 0)
    # The row count is known only at the end of this pass: lines every 30 s, count and rate.
    with Progress("hashing the data", None, "rows", enabled=progress) as bar:
        for split in SPLITS:
            h.update(f"\0split:{split}\0".encode())
            for part in parts[split]:
                h.update(f"\0source:{part.name}\0".encode())
                for chunk in _chunks(part.items(), HASH_CHUNK):
                    h.update(cache.rows_digest(chunk))
                    rows[split] += len(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()[:32], rows


# -- tokenizing -------------------------------------------------------------------------
_PROCESSOR: Processor | None = None


@dataclass
class _Task:
    split: str
    name: str  # the part
    first: int = 0  # index of the first row within its part
    rows: list[Item] | None = None  # None: the part ends here


class _Ready:
    def __init__(self, value: BatchResult) -> None:
        self.value = value

    def get(self) -> BatchResult:
        return self.value


def _init_worker(tokenizer: Any, settings: ProcessorSettings) -> None:
    global _PROCESSOR
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    # A forked worker inherits the run's SIGTERM/SIGUSR1 handler (`StopFlag`), which only
    # sets a flag: `Pool.terminate` could then not end a worker waiting on the task queue,
    # and the run hung at the end of tokenizing. Workers die on SIGTERM/SIGUSR1 and leave
    # Ctrl-C to the run, which ends the pool.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PROCESSOR = Processor(tokenizer, settings)


def _work(payload: tuple[list[dict[str, Any]], int]) -> BatchResult:
    assert _PROCESSOR is not None
    rows, first = payload
    return _PROCESSOR.process_batch(rows, _wheres(first, len(rows)))


def _wheres(first: int, n: int) -> list[str]:
    """Row labels for errors, used when a reader did not record the row's origin."""
    return [f"row {k}" for k in range(first, first + n)]


def _tasks(parts: dict[str, list[Part]], size: int) -> Iterator[_Task]:
    for split in SPLITS:
        for part in parts[split]:
            first = 0
            for chunk in _chunks(part.items(), size):
                yield _Task(split, part.name, first, chunk)
                first += len(chunk)
            yield _Task(split, part.name)


def _ordered(
    tasks: Iterable[_Task], submit: Callable[[_Task], Any], window: int
) -> Iterator[tuple[_Task, BatchResult | None]]:
    """Results in task order with at most `window` chunks in flight (bounded memory:
    `Pool.imap` would read every row ahead into its queue)."""
    pending: deque[tuple[_Task, Any]] = deque()
    for task in tasks:
        pending.append((task, None if task.rows is None else submit(task)))
        while pending and (len(pending) > window or pending[0][1] is None):
            done, handle = pending.popleft()
            yield done, None if handle is None else handle.get()
    while pending:
        done, handle = pending.popleft()
        yield done, None if handle is None else handle.get()


def _build(
    parts: dict[str, list[Part]],
    tokenizer: Any,
    settings: ProcessorSettings,
    workers: int,
    cache_dir: Path,
    key: str,
    total: int,
    progress: bool,
) -> dict[str, Any]:
    """Tokenize every split into a new cache entry (written as the chunks arrive); returns
    its metadata."""
    workers = min(workers, os.cpu_count() or 1, max(1, total // 64))
    # ~16 chunks per worker keep the last one from finishing long after the others
    size = min(max(16, -(-total // (workers * 16))), CHUNK_MAX)
    tmp = cache.new_entry(cache_dir, key)
    try:
        writers = {split: cache.SplitWriter(tmp, split) for split in SPLITS}
        bar = Progress("tokenizing and writing the data cache", total, "rows", enabled=progress)
        with _gc_paused(), bar, _submitter(tokenizer, settings, workers) as (submit, window):
            for task, result in _ordered(_tasks(parts, size), submit, window):
                if result is None:
                    writers[task.split].end_source(task.name)
                else:
                    assert task.rows is not None
                    writers[task.split].add(result, [t for _, t in task.rows])
                    bar.update(len(task.rows))
        meta = {split: writer.close() for split, writer in writers.items()}
        cache.publish(tmp, cache_dir / key, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


@contextmanager
def _submitter(
    tokenizer: Any, settings: ProcessorSettings, workers: int
) -> Iterator[tuple[Callable[[_Task], Any], int]]:
    """(submit a chunk, chunks in flight): in this process, or in a pool of `workers`."""
    if workers <= 1:
        processor = Processor(tokenizer, settings)

        def run_here(task: _Task) -> _Ready:
            assert task.rows is not None
            rows = [r for r, _ in task.rows]
            return _Ready(processor.process_batch(rows, _wheres(task.first, len(rows))))

        yield run_here, 0
        return
    fork = sys.platform == "linux"  # fork shares the tokenizer for free
    ctx = mp.get_context("fork" if fork else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, settings)) as pool:

        def run_there(task: _Task) -> Any:
            assert task.rows is not None
            return pool.apply_async(_work, (([r for r, _ in task.rows], task.first),))

        yield run_there, 2 * workers


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
