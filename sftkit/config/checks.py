"""Checks on a config: unknown keys (with the nearest valid key), cross-field rules, and
the NeMo RL settings that sftkit accepts but ignores."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from sftkit.config.checks_qlora import qlora_problems
from sftkit.config.compat import MEGATRON_HONOURED
from sftkit.config.errors import ConfigError
from sftkit.config.schema import (
    CHOICES,
    DATASET_KEYS,
    DERIVED_DEFAULTS,
    FP8_FORMATS,
    FP8_RECIPES,
    IGNORED_KEYS,
    MasterConfig,
    OptimizerConfig,
)

_MUST_SAVE_BY = re.compile(r"\d+:\d+:\d+:\d+")
_FLOAT32_MAX = 3.4028234663852886e38  # optimizer hyperparameters become float32 in the kernels
_MAX_LISTED_KEYS = 16


# ---- the schema as a tree of types -------------------------------------------------------


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def strip_optional(tp: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, else (`tp`, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def section_class(tp: Any) -> type | None:
    """The dataclass a field holds (a config section), or None for leaves and free dicts."""
    inner, _ = strip_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def schema_type(path: str, root: type = MasterConfig) -> Any | None:
    """The annotation of a dotted schema path, or None when the schema does not know it."""
    cls: type | None = root
    tp: Any = None
    for seg in path.split("."):
        if cls is None or seg not in field_types(cls):
            return None
        tp = field_types(cls)[seg]
        cls = section_class(tp)
    return tp


@cache
def schema_paths(root: type = MasterConfig) -> tuple[str, ...]:
    """Every dotted key of the schema (`root`: the training config's), sections included."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for name, tp in field_types(cls).items():
            out.append(prefix + name)
            sub = section_class(tp)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(root, "")
    return tuple(out)


def type_name(tp: Any) -> str:
    """A short readable name of a field type: `int`, `str or null`, `list of str`, ..."""
    inner, optional = strip_optional(tp)
    if section_class(inner) is not None:
        name = f"a mapping (section {inner.__name__})"
    elif inner is Any:
        name = "any value"
    elif typing.get_origin(inner) in (list, dict):
        args = typing.get_args(inner)
        name = f"list of {type_name(args[0])}" if typing.get_origin(inner) is list else "a mapping"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def source_of(sources: dict[str, str], path: str) -> str | None:
    """Where `path` was set: the entry for the key or its nearest enclosing section."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = sources.get(".".join(parts[:end]))
        if found:
            return found
    return None


def _where(sources: dict[str, str], path: str) -> str:
    source = source_of(sources, path)
    return f" (set in {source})" if source else ""


# ---- unknown keys -----------------------------------------------------------------------


def unknown_key_message(path: str, root: type = MasterConfig) -> str | None:
    """None if the schema knows `path` (or it lies in a free-form field), else the error text.

    `root` is the schema's top dataclass: the training config's, or another command's
    (`sftkit.eval.config.EvalConfig`), which gets the same messages.
    """
    cls: type = root
    walked: list[str] = []
    for seg in path.split("."):
        fields = field_types(cls)
        if seg not in fields:
            return _unknown_message(".".join(walked), seg, cls, root)
        walked.append(seg)
        sub = section_class(fields[seg])
        if sub is None:
            return None  # a leaf or a free-form mapping: anything below it is data
        cls = sub
    return None


def _unknown_message(prefix: str, key: str, cls: type, root: type = MasterConfig) -> str:
    path = f"{prefix}.{key}" if prefix else key
    candidates = list(field_types(cls))
    if prefix == "data" and root is MasterConfig:
        candidates += sorted(DATASET_KEYS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    suggestion: str | None
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
    else:
        suggestion = _elsewhere(key, path, root)
    if suggestion:
        return f"Unknown config key '{path}'. Did you mean '{suggestion}'?"
    where = f"'{prefix}'" if prefix else "the top level"
    if len(candidates) <= _MAX_LISTED_KEYS:
        return (
            f"Unknown config key '{path}'. Valid keys under {where}: "
            f"{', '.join(sorted(candidates))}."
        )
    module = root.__module__.replace(".", "/")
    return f"Unknown config key '{path}'. See {module}.py for the keys under {where}."


def _elsewhere(key: str, path: str, root: type = MasterConfig) -> str | None:
    """A key of the same name in another section (a misplaced key), or a close full path."""
    same_leaf = [p for p in schema_paths(root) if p.rsplit(".", 1)[-1] == key]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(path, schema_paths(root), n=1, cutoff=0.85)
    return close[0] if close else None


def check_keys(tree: dict[str, Any], sources: dict[str, str], root: type = MasterConfig) -> None:
    """Raise one ConfigError listing every key of the plain `tree` that the schema (`root`)
    does not know, every section given a non-mapping value, and malformed
    `data.train`/`validation` (training config)."""
    errors: list[tuple[str, str]] = []  # (path, message)

    def walk(node: dict[str, Any], cls: type, prefix: str) -> None:
        fields = field_types(cls)
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key not in fields:
                errors.append((path, _unknown_message(prefix.rstrip("."), str(key), cls, root)))
                continue
            sub = section_class(fields[key])
            if sub is not None and isinstance(value, dict):
                walk(value, sub, path + ".")
            elif sub is not None and not _section_value_ok(value, fields[key]):
                errors.append(
                    (
                        path,
                        f"Config key '{path}' has value {value!r} ({type(value).__name__}); "
                        f"expected {type_name(fields[key])}.",
                    )
                )

    walk(tree, root, "")
    data = tree.get("data") if root is MasterConfig else None
    for name in ("train", "validation"):
        value = data.get(name) if isinstance(data, dict) else None
        message = None if _is_interpolation(value) else _dataset_shape_error(f"data.{name}", value)
        if message:
            errors.append((f"data.{name}", message))
    if errors:
        first = errors[0][0]
        message = "\n".join(text + _where(sources, path) for path, text in errors)
        raise ConfigError(message, path=first, source=source_of(sources, first))


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _section_value_ok(value: Any, tp: Any) -> bool:
    return _is_interpolation(value) or (value is None and strip_optional(tp)[1])


# ---- cross-field rules ------------------------------------------------------------------


def _get(obj: Any, path: str) -> Any:
    for seg in path.split("."):
        obj = obj[seg] if isinstance(obj, dict) else getattr(obj, seg)
    return obj


def check_config(cfg: MasterConfig, sources: dict[str, str] | None = None) -> None:
    """Cross-field rules that need only the config; one ConfigError lists every violation."""
    sources = sources or {}
    problems: list[tuple[str, str]] = []  # (path, message)
    policy = cfg.policy
    if policy.train_micro_batch_size < 1 or policy.train_global_batch_size < 1:
        problems.append(
            (
                "policy.train_micro_batch_size",
                "policy.train_global_batch_size and policy.train_micro_batch_size must be "
                f">= 1 (got {policy.train_global_batch_size} and "
                f"{policy.train_micro_batch_size}).",
            )
        )
    elif policy.train_global_batch_size % policy.train_micro_batch_size:
        gbs, mbs = policy.train_global_batch_size, policy.train_micro_batch_size
        problems.append(
            (
                "policy.train_global_batch_size",
                f"policy.train_global_batch_size ({gbs}) must be a multiple of "
                f"policy.train_micro_batch_size ({mbs}): set it to {gbs - gbs % mbs or mbs} "
                f"or {gbs + mbs - gbs % mbs}, or change the micro batch size.",
            )
        )
    metric = cfg.checkpointing.metric_name
    if metric is not None and not metric.startswith(("val:", "train:")):
        problems.append(
            (
                "checkpointing.metric_name",
                f"checkpointing.metric_name is {metric!r}; it must start with 'val:' or "
                f"'train:', e.g. 'val:{metric.split(':')[-1]}', or be null.",
            )
        )
    deadline = cfg.checkpointing.checkpoint_must_save_by
    if deadline is not None and not _MUST_SAVE_BY.fullmatch(deadline):
        problems.append(
            (
                "checkpointing.checkpoint_must_save_by",
                f"checkpointing.checkpoint_must_save_by is {deadline!r}; write the time budget "
                "as DD:HH:MM:SS in quotes (YAML reads an unquoted 1:00:00:00 as a number), "
                'e.g. "00:03:30:00".',
            )
        )
    if policy.sequence_packing.enabled and policy.dynamic_batching.enabled:
        problems.append(
            (
                "policy.sequence_packing.enabled",
                "policy.sequence_packing.enabled and policy.dynamic_batching.enabled are both "
                "true; they are mutually exclusive: set one of them to false.",
            )
        )
    d = policy.dtensor_cfg
    if d.bf16_params_update != "none" and not (d.bf16_params and policy.precision == "bfloat16"):
        problems.append(
            (
                "policy.dtensor_cfg.bf16_params_update",
                f"policy.dtensor_cfg.bf16_params_update is {d.bf16_params_update!r}, which "
                "rounds updates into bf16 parameters, but the parameters are float32: set "
                "policy.dtensor_cfg.bf16_params=true and policy.precision=bfloat16, or "
                "bf16_params_update=none.",
            )
        )
    if d.activation_offload and d.compile:
        problems.append(
            (
                "policy.dtensor_cfg.activation_offload",
                "policy.dtensor_cfg.activation_offload and compile are both true; torch.compile "
                "does not trace the saved-tensor hooks that move activations to host memory: "
                "set one of them to false.",
            )
        )
    fp8 = d.fp8_cfg
    fp8_error = fp8.enabled and fp8_config_error(fp8.fp8_recipe, fp8.fp8, fp8.fp8_param)
    if fp8.enabled and d.tensor_parallel_size > 1:  # torchao needs its Float8 TP plan styles
        fp8_error = "enabled with tensor_parallel_size > 1 is not supported yet: set one to 1"
    if fp8_error:
        meg = policy.megatron_cfg
        where = "megatron_cfg" if meg.enabled and meg.fp8_cfg.enabled else "dtensor_cfg"
        problems.append((f"policy.{where}.fp8_cfg", f"policy.{where}.fp8_cfg.{fp8_error}."))
    problems += choice_problems(cfg, CHOICES)
    problems += _optimizer_number_problems(policy.optimizer)
    problems += _lora_problems(cfg) + qlora_problems(cfg)
    shape_ok = True
    for name in ("train", "validation"):
        message = _dataset_shape_error(f"data.{name}", getattr(cfg.data, name))
        if message:
            problems.append((f"data.{name}", message))
            shape_ok = False
    if shape_ok:
        problems += _dataset_entry_problems(cfg.data.train, cfg.data.default, "data.train")
        problems += _dataset_entry_problems(cfg.data.validation, None, "data.validation")
    raise_problems(problems, sources)


def _lora_problems(cfg: MasterConfig) -> list[tuple[str, str]]:
    """The rank and dropout of the LoRA that trains (Megatron's peft is translated into
    lora_cfg at load), named by the key the user set; checked before any data is read."""
    lora = cfg.policy.dtensor_cfg.lora_cfg
    if not lora.enabled:
        return []
    meg = cfg.policy.megatron_cfg.enabled
    section = "policy.megatron_cfg.peft" if meg else "policy.dtensor_cfg.lora_cfg"
    problems = []
    if isinstance(lora.dim, bool) or lora.dim < 1:
        problems.append(
            (
                f"{section}.dim",
                f"{section}.dim is {lora.dim!r}; the LoRA rank must be >= 1, e.g. 8.",
            )
        )
    if not 0.0 <= lora.dropout < 1.0:  # NaN fails this too
        problems.append(
            (f"{section}.dropout", f"{section}.dropout is {lora.dropout!r}; use a value in [0, 1).")
        )
    key = "policy.dtensor_cfg.lora_cfg.target_experts"
    if lora.target_experts and lora.dropout > 0:
        problems.append((key, (
            f"{key} is true with dropout {lora.dropout}: an expert adapter is a weight delta, "
            f"where dropout has no meaning (PEFT refuses it too); set {section}.dropout=0 or "
            f"{key}=false."
        )))  # fmt: skip
    d_tp = cfg.policy.dtensor_cfg.tensor_parallel_size
    if lora.target_experts and d_tp > 1:
        problems.append((key, (
            f"{key} is true with tensor_parallel_size {d_tp}: expert adapters are not split "
            "over tensor-parallel ranks; set policy.dtensor_cfg.tensor_parallel_size=1 (FSDP2 "
            f"shards them) or {key}=false."
        )))  # fmt: skip
    problems += _dora_problems(cfg)
    return problems


def _dora_problems(cfg: MasterConfig) -> list[tuple[str, str]]:
    """DoRA's layouts: no tensor parallelism (the row norm of a row-wise split weight would
    need a reduction across ranks), dropout only where PEFT puts it."""
    lora, d = cfg.policy.dtensor_cfg.lora_cfg, cfg.policy.dtensor_cfg
    key = "policy.dtensor_cfg.lora_cfg.use_dora"
    if not lora.use_dora:
        return []
    problems = []
    if d.tensor_parallel_size > 1:
        problems.append((key, f"{key}=true is not supported with tensor parallelism "
                              "(tensor_parallel_size > 1): use FSDP2 only, or use_dora=false."))  # fmt: skip
    if lora.target_experts:
        problems.append((key, f"{key}=true does not apply to MoE experts: set "
                              "lora_cfg.target_experts=false, or use_dora=false."))  # fmt: skip
    if lora.dropout > 0 and lora.dropout_position == "post":
        problems.append((key, f"{key}=true with dropout > 0 needs lora_cfg.dropout_position=pre "
                              "(PEFT's DoRA drops the LoRA input; 'post' has no DoRA form)."))  # fmt: skip
    return problems


def default_name(config: dict[str, Any]) -> str:
    """A dataset entry's name when it sets none: the file (or hub dataset) stem of
    `data_path`, else the dataset name."""
    path = config.get("data_path")
    if path:
        return Path(str(path).rstrip("/")).stem or str(path)
    return str(config.get("dataset_name") or "dataset").rpartition(".")[2]


def _dataset_entry_problems(value: Any, default: Any, key: str) -> list[tuple[str, str]]:
    """Names (strings, distinct) and weights (on every data.train entry or none, > 0) of the
    entries of `data.train` / `data.validation`, each message naming its entry."""
    raw = _plain(value)
    entries = [
        {**(_plain(default) or {}), **e} for e in ([raw] if isinstance(raw, dict) else raw or [])
    ]
    weighted = key == "data.train"
    weights = [e.get("weight") for e in entries]
    seen: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    for k, entry in enumerate(entries):
        name = entry.get("name") or default_name(entry)
        weight = entry.get("weight")
        where = f"{key}[{k}] ({name})"
        if not isinstance(name, str):
            problems.append((key, f"{where}: name must be a string."))
            continue
        if weight is not None and not weighted:
            problems.append(
                (key, f"{where}: weight applies to data.train entries only; remove it.")
            )
        elif weighted and weight is None and any(w is not None for w in weights):
            problems.append((key, (
                f"{where} has no weight but other data.train entries have one: give every "
                "data.train entry a weight (relative, > 0), or none for plain concatenation."
            )))  # fmt: skip
        elif weight is not None and (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            problems.append((key, f"{where}: weight={weight!r}; use a number > 0."))
        if name in seen:
            problems.append((key, (
                f"{key}[{seen[name]}] and {key}[{k}] are both named {name!r}; give one of them "
                "a distinct `name`."
            )))  # fmt: skip
        seen[name] = k
    return problems


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def unmeasured_saves(cfg: MasterConfig) -> str | None:
    """Why some periodic checkpoints will lack their `val:` ranking metric (they then rank
    last and are kept only while they are the latest), or None; said once at load."""
    c, period = cfg.checkpointing, cfg.sft.val_period
    metric = c.metric_name
    if not (c.enabled and c.keep_top_k is not None and metric and metric.startswith("val:")):
        return None
    saves = [(k, v) for k, v in (("save_period", c.save_period), ("ft_save_period", c.ft_save_period)) if v and v > 0]  # fmt: skip
    misaligned = [(k, v) for k, v in saves if period <= 0 or v % period]
    if not misaligned:
        return None
    key, value = misaligned[0]
    every = f"every {period} steps" if period > 0 else "never periodically (sft.val_period <= 0)"
    return (
        f"checkpointing.metric_name={metric} is measured {every}, but checkpointing.{key}="
        f"{value} saves at other steps: those checkpoints rank last and are kept only while "
        f"they are the latest. Make checkpointing.{key} a multiple of sft.val_period, or rank "
        "by a train: metric."
    )


def choice_problems(cfg: Any, choices: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(path, message) for each choice field of `cfg` set outside its allowed values."""
    problems = []
    for path, allowed in choices.items():
        value = _get(cfg, path)
        if value is not None and value not in allowed:
            problems.append(
                (path, f"{path} is {value!r}; choose one of {', '.join(map(repr, allowed))}.")
            )
    return problems


def raise_problems(problems: list[tuple[str, str]], sources: dict[str, str]) -> None:
    """One ConfigError listing every (path, message), each with where its key was set."""
    if problems:
        raise ConfigError(
            "\n".join(msg + _where(sources, path) for path, msg in problems),
            path=problems[0][0],
            source=source_of(sources, problems[0][0]),
        )


def _optimizer_number_problems(optimizer: OptimizerConfig | None) -> list[tuple[str, str]]:
    """lr, weight_decay and eps must be finite in float32: `lr=1e45` otherwise ends in
    torch's "value cannot be converted to type float without overflow" at the first step."""
    kwargs = (optimizer.kwargs if optimizer else None) or {}
    problems = []
    for name in ("lr", "weight_decay", "eps"):
        value = kwargs.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not abs(value) <= _FLOAT32_MAX:  # NaN fails this too
            path = f"policy.optimizer.kwargs.{name}"
            problems.append(
                (path, f"{path} is {value!r}, beyond float32's range (3.4e38): use a finite value.")
            )
    return problems


def fp8_config_error(recipe: str, fp8: str, fp8_param: bool) -> str | None:
    """Why this `fp8_cfg` cannot run on torchao (the fix included), or None."""
    if recipe not in FP8_RECIPES:
        return (
            f"fp8_recipe is {recipe!r}, which torchao's float8 training has no equivalent "
            f"for; choose one of {', '.join(map(repr, FP8_RECIPES))}"
        )
    if fp8 not in FP8_FORMATS:
        return f"fp8 is {fp8!r}; choose one of {', '.join(map(repr, FP8_FORMATS))}"
    if recipe == "rowwise_with_gw_hp" and fp8 != "e4m3":
        return "fp8_recipe 'rowwise_with_gw_hp' uses e4m3 gradients: set fp8 to 'e4m3'"
    if fp8_param:
        return (
            "fp8_param (FP8 parameter storage) is not supported: parameters stay in "
            "bf16/float32 and are cast to FP8 per GEMM; set fp8_param to false"
        )
    return None


def _dataset_shape_error(path: str, value: Any) -> str | None:
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return None
    return (
        f"{path} is {value!r}; it must be a dataset config (a mapping such as "
        "{dataset_name: ResponseDataset, data_path: train.jsonl}), a list of them, or null."
    )


# ---- settings sftkit ignores ------------------------------------------------------------


@cache
def _default_tree(root: type = MasterConfig) -> dict[str, Any]:
    return dataclasses.asdict(root())


def _default_value(tree: dict[str, Any], path: str, root: type) -> Any:
    if root is MasterConfig and path in DERIVED_DEFAULTS:
        return _get(tree, DERIVED_DEFAULTS[path])
    return _get(_default_tree(root), path)


def _leaves(value: Any, path: str, root: type) -> list[str]:
    """Leaf paths under `path` when it is a schema section, else just `path`."""
    tp = schema_type(path, root)
    if tp is None or section_class(tp) is None or not isinstance(value, dict):
        return [path]
    return [leaf for key, sub in value.items() for leaf in _leaves(sub, f"{path}.{key}", root)]


def ignored_settings(
    cfg: Any, root: type = MasterConfig, ignored: dict[str, str] | None = None
) -> list[str]:
    """Dotted paths in `ignored` (default `IGNORED_KEYS`; or below a listed section) set to
    a non-default value in `cfg`, an instance (or dict) of the schema `root`.

    A disabled `megatron_cfg` is not read (by NeMo RL either); an enabled one's optimizer
    and schedule are honoured (`sftkit.config.compat.megatron_optimizer`).
    """
    is_instance = dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
    tree = dataclasses.asdict(cfg) if is_instance else cfg
    training = root is MasterConfig
    megatron = training and bool(_get(tree, "policy.megatron_cfg.enabled"))
    found: list[str] = []
    for path in IGNORED_KEYS if ignored is None else ignored:
        if training and path.startswith("policy.megatron_cfg.") and not megatron:
            continue
        for leaf in _leaves(_get(tree, path), path, root):
            if megatron and leaf in MEGATRON_HONOURED:
                continue
            value = _get(tree, leaf)
            if training and value is None and leaf in DERIVED_DEFAULTS:
                continue  # not filled yet (a schema instance built in code): the default
            if value != _default_value(tree, leaf, root):
                found.append(leaf)
    return found


def ignored_reason(path: str, ignored: dict[str, str] | None = None) -> str:
    """The reason recorded in `ignored` (default `IGNORED_KEYS`) for `path` or its nearest
    listed section."""
    table = IGNORED_KEYS if ignored is None else ignored
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        reason = table.get(".".join(parts[:end]))
        if reason:
            return reason
    return "not acted on"
