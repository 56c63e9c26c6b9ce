"""The dataset table: built-in names, plus any class by dotted import path as a drop-in.

A drop-in is any class whose instances have `formatted_ds` ({"train", "validation"}) and
`task_spec` (with a `task_name`), as NeMo RL's SFT guide describes, or NeMo RL's current
protocol: rows in `.dataset` (and `.val_dataset`), a `task_name`, and `set_task_spec(cfg)`,
built with the whole entry (`dataset_name` and `processor` included) as keyword arguments.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from sftkit.config.schema import DATASET_KEYS
from sftkit.data.datasets.base import RawDataset, Row, TaskDataSpec, split_rows
from sftkit.data.datasets.gsm8k import GSM8KDataset
from sftkit.data.datasets.math import (
    DAPOMath17KDataset,
    DeepScalerDataset,
    NemotronCascade2SFTMathDataset,
    NuminaMath15Dataset,
    OpenR1Math220KDataset,
)
from sftkit.data.datasets.oasst import OasstDataset
from sftkit.data.datasets.openai_format import OpenAIFormatDataset
from sftkit.data.datasets.openmath import OpenMathInstruct2Dataset
from sftkit.data.datasets.response import ResponseDataset
from sftkit.data.datasets.squad import SquadDataset
from sftkit.data.datasets.tulu3 import Tulu3SftMixtureDataset
from sftkit.data.turns import TRAIN_KEY, check_rules

logger = logging.getLogger("sftkit")

DATASETS: dict[str, type] = {
    "ResponseDataset": ResponseDataset,
    "openai_format": OpenAIFormatDataset,
    "squad": SquadDataset,
    "open_assistant": OasstDataset,
    "OpenMathInstruct-2": OpenMathInstruct2Dataset,
    "tulu3_sft_mixture": Tulu3SftMixtureDataset,
    "gsm8k": GSM8KDataset,
    "GSM8K": GSM8KDataset,
    "NuminaMath-1.5": NuminaMath15Dataset,
    "OpenR1-Math-220k": OpenR1Math220KDataset,
    "Nemotron-Cascade-2-SFT-Math": NemotronCascade2SFTMathDataset,
    "DAPOMath17K": DAPOMath17KDataset,
    "DeepScaler": DeepScalerDataset,
}
# Keys of a dataset entry that select or process it rather than configure the class.
ENTRY_KEYS = ("dataset_name", "processor", "env_name")
TRAIN_RULE_KEYS = ("roles_to_train", "train_tool_calls_only")  # sftkit's, never passed on
# Keys that change which data a run sees: a `**kwargs` class that does not declare one
# would swallow it silently (NeMo RL's `_BEHAVIORAL_DATASET_CONFIG_KEYS`).
BEHAVIOURAL_KEYS = ("chosen_key", "data_path", "download_dir", "input_key", "output_key",
                    "prompt_key", "rejected_key", "seed", "split", "split_validation_size",
                    "subset")  # fmt: skip
PROCESSORS = ("sft_processor", "default")  # NeMo RL's names for the SFT processor
# Keys some NeMo RL dataset takes: unused ones are warned about, never called typos.
KNOWN_KEYS = DATASET_KEYS | {"env_name"}

__all__ = [
    "DATASETS",
    "RawDataset",
    "TaskDataSpec",
    "has_split",
    "iter_rows",
    "load_dataset",
    "resolve_class",
    "rows_of",
    "split_rows",
]


def resolve_class(name: str) -> type:
    """A built-in name or `package.module.Class`."""
    if name in DATASETS:
        return DATASETS[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"dataset_name={name!r}: cannot import it ({err}).") from err
        if not callable(found):
            raise ValueError(
                f"dataset_name={name!r} names a {type(found).__name__} ({found!r:.60}), not a "
                "dataset class: point it at the class (my_pkg.module.MyDataset)."
            )
        return found
    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"dataset_name={name!r} is not a built-in dataset ({', '.join(DATASETS)}) nor a dotted "
        f"import path (my_pkg.module.MyDataset).{hint}"
    )


def load_dataset(entry: Mapping[str, Any]) -> Any:
    """Build the dataset an entry of `data.train` / `data.validation` describes.

    Keys the class does not take are reported once and ignored, as NeMo RL does; a
    `prompt_file`/`system_prompt_file` the class does not take is applied to its task spec.
    """
    entry = dict(entry)
    name = entry.get("dataset_name") or ("ResponseDataset" if "data_path" in entry else None)
    if not name:
        raise ValueError(
            "a data.train/data.validation entry has no dataset_name. Set dataset_name to a "
            f"built-in ({', '.join(DATASETS)}) or a dotted class path, or give data_path "
            "(ResponseDataset)."
        )
    cls = resolve_class(str(name))
    rules = check_rules(str(name), entry.get("roles_to_train"), entry.get("train_tool_calls_only"))
    # null means the class's default (NeMo RL's configs carry `subset: null`, `split: null`)
    entry = {k: v for k, v in entry.items() if v is not None and k not in TRAIN_RULE_KEYS}
    kwargs = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    _check_processor(entry.get("processor"), str(name))
    params = _parameters(cls)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        _report_swallowed(cls, str(name), entry)
        kwargs = {**kwargs, **{k: entry[k] for k in ENTRY_KEYS if k in entry}}  # as NeMo RL
    else:
        _report_unused(str(name), kwargs, params)
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    _check_required(str(name), entry, kwargs, params)
    dataset = cls(**kwargs)
    _adopt_nemo_protocol(dataset, entry)
    _check(dataset, str(name))
    if rules is not None:
        dataset.sftkit_train_rules = rules
    spec = dataset.task_spec
    for key in ("prompt_file", "system_prompt_file"):
        if entry.get(key) and key not in params:
            setattr(spec, key, entry[key])
            spec.prompt = spec.system_prompt = None
            spec.__post_init__()
    return dataset


def _parameters(cls: Any) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(cls).parameters
    except (TypeError, ValueError) as err:
        raise ValueError(f"dataset class {cls!r}: cannot read its arguments ({err}).") from err


def _report_swallowed(cls: Any, name: str, entry: Mapping[str, Any]) -> None:
    """Warn about each data-changing key a `**kwargs` class declares nowhere in its
    `__init__` chain (it would be swallowed), naming `key=value` as NeMo RL does."""
    accepted: set[str] = set()
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if init is not None:
            accepted.update(inspect.signature(init).parameters)
    unused = [
        f"{key}={entry[key]!r}"
        for key in BEHAVIOURAL_KEYS
        if key in entry and key not in accepted
        and not (key == "split_validation_size" and not entry[key])
    ]  # fmt: skip
    if unused:
        logger.warning(
            "dataset %s does not take %s (its **kwargs swallow them); ignored. Remove them, "
            "or use a dataset class that supports them.",
            name,
            ", ".join(unused),
        )


def _adopt_nemo_protocol(dataset: Any, entry: Mapping[str, Any]) -> None:
    """NeMo RL's current protocol: `.dataset`/`.val_dataset` rows and `set_task_spec(cfg)`."""
    if getattr(dataset, "formatted_ds", None) is not None or not hasattr(dataset, "dataset"):
        return
    if hasattr(dataset, "set_task_spec") and getattr(dataset, "task_spec", None) is None:
        dataset.set_task_spec(dict(entry))
    spec = getattr(dataset, "task_spec", None)
    name = getattr(spec, "task_name", None) or getattr(dataset, "task_name", None)
    if name and not hasattr(spec, "apply"):  # NeMo RL's own spec: sftkit's applies the prompt
        dataset.task_spec = TaskDataSpec(
            name, entry.get("prompt_file"), entry.get("system_prompt_file")
        )
    dataset.formatted_ds = {
        "train": dataset.dataset,
        "validation": getattr(dataset, "val_dataset", None),
    }


def _check_required(
    name: str, entry: Mapping[str, Any], kwargs: Mapping[str, Any], params: Mapping[str, Any]
) -> None:
    """A required argument the entry lacks is one line naming it, not a TypeError."""
    required = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [
        key
        for key, p in params.items()
        if p.kind in required and p.default is inspect.Parameter.empty and key not in kwargs
    ]
    if not missing:
        return
    hint = ""
    if "train_data_path" in entry or "val_data_path" in entry:
        hint = (
            " train_data_path/val_data_path belong to NeMo RL's older flat data form, which "
            "sftkit does not map: set data.train.data_path (and data.validation.data_path)."
        )
    raise ValueError(
        f"dataset_name={name!r} needs {', '.join(missing)}, which the data entry does not "
        f"set.{hint}"
    )


def _report_unused(name: str, kwargs: dict[str, Any], params: Mapping[str, Any]) -> None:
    """Fail on a misspelt key; warn once about NeMo RL keys this class does not take.

    A key that is no NeMo RL dataset key but close to one this class takes is a typo
    (`input_kye`): ignoring it would train on the wrong column. Keys equal to the
    `data.default` values of the seed guide (`input_key: input`, ...) reach every entry
    through the merge, so they are not worth a warning.
    """
    unused = [k for k in kwargs if k not in params and kwargs[k] is not None]
    for key in unused:
        close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.75)
        if key not in KNOWN_KEYS and close:
            raise ValueError(
                f"dataset {name}: unknown key {key!r}. Did you mean {close[0]!r}? Rename it in "
                "data.train / data.validation / data.default."
            )
    neutral = inspect.signature(ResponseDataset).parameters
    noisy = sorted(k for k in unused if not (k in neutral and kwargs[k] == neutral[k].default))
    if noisy:
        logger.warning("dataset %s does not take %s; ignored", name, ", ".join(noisy))


def _check_processor(processor: Any, name: str) -> None:
    if processor not in (None, *PROCESSORS):
        logger.warning(
            "dataset %s: processor=%r is not an SFT processor; sftkit uses sft_processor "
            "(set processor: sft_processor to silence this)",
            name,
            processor,
        )


def _check(dataset: Any, name: str) -> None:
    if (
        not isinstance(getattr(dataset, "formatted_ds", None), Mapping)
        or "train" not in dataset.formatted_ds
    ):
        raise ValueError(
            f"dataset {name}: needs a `formatted_ds` dict with 'train' and 'validation'."
        )
    if not getattr(getattr(dataset, "task_spec", None), "task_name", None):
        raise ValueError(f"dataset {name}: needs a `task_spec` with a task_name (a TaskDataSpec).")


def rows_of(dataset: Any, split: str) -> list[Row]:
    """A split of `formatted_ds` as a list of dicts, each with an `_origin`."""
    return list(iter_rows(dataset, split))


def has_split(dataset: Any, split: str) -> bool:
    """Whether `formatted_ds` has rows for `split` (lazy splits count as having rows)."""
    part = dataset.formatted_ds.get(split)
    return part is not None and (not isinstance(part, list) or len(part) > 0)


def iter_rows(dataset: Any, split: str) -> Iterator[Row]:
    """A split of `formatted_ds` row by row, each with an `_origin`."""
    part = dataset.formatted_ds.get(split)
    if part is None:
        return
    label = f"{dataset.task_spec.task_name}[{split}]"
    rules = getattr(dataset, "sftkit_train_rules", None)
    for k, row in enumerate(part):
        row = dict(row)
        row.setdefault("_origin", f"{label} row {k}")
        if rules is not None:
            row[TRAIN_KEY] = rules
        yield row
