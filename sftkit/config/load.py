"""Load a NeMo RL style YAML config into the typed schema, validated once.

Order: read the file and its `defaults:` chain (parents first, child wins, `_override_:
true` replaces a parent's section), apply command-line overrides, move the seed's flat
dataset keys into `data.extra`, reject unknown keys, merge into the schema (types),
resolve `${...}` interpolations (`mul`, `add`, `sub`, `div`, `max` resolvers), fill
every derived value and translate other NeMo RL/Megatron spellings (`config/derive.py`,
`config/compat.py`), run cross-field checks (`config/checks.py`). Every error is a `ConfigError` naming the key,
the value, the expectation and the file or override it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._utils import _DEFAULT_MARKER_
from omegaconf.errors import OmegaConfBaseException
from omegaconf.resolvers import oc

from sftkit.config.checks import (
    check_config,
    check_keys,
    ignored_reason,
    ignored_settings,
    schema_type,
    section_class,
    source_of,
    type_name,
    unknown_key_message,
    unmeasured_saves,
)
from sftkit.config.compat import alias_key, rename_aliases, rewrite_references
from sftkit.config.derive import derive
from sftkit.config.errors import ConfigError
from sftkit.config.limits import check_defaults_depth, check_sections, check_yaml_file
from sftkit.config.overrides import apply_overrides, lookup
from sftkit.config.ranges import check_ranges
from sftkit.config.schema import DATASET_KEYS, DataConfig, MasterConfig

logger = logging.getLogger("sftkit")

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"
OVERRIDE_MARKER = "_override_"

_RESOLVERS: dict[str, Any] = {
    "mul": lambda a, b: a * b,
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    # An exact int quotient stays an int, so `${div:...}` can fill an int field; NeMo RL's
    # untyped config never needed that.
    "div": lambda a, b: (
        a // b if isinstance(a, int) and isinstance(b, int) and a % b == 0 else a / b
    ),
    "max": lambda a, b: max(a, b),
}


def register_resolvers() -> None:
    """Register NeMo RL's OmegaConf resolvers once; a resolver of the same name is kept.

    `oc.env` is wrapped so that the value of a secret-looking variable (`${oc.env:HF_TOKEN}`)
    is remembered and scrubbed from everything written or logged, however short it is.
    """
    for name, fn in _RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    global _env_wrapped
    if not _env_wrapped:
        OmegaConf.register_new_resolver("oc.env", _env_resolver, replace=True, use_cache=False)
        _env_wrapped = True


_env_wrapped = False


def _env_resolver(key: str, default: Any = _DEFAULT_MARKER_) -> str | None:
    value = oc.env(key, default)
    # Imported here: `sftkit.log` imports torch (3 s), which loading a config does not need.
    from sftkit.log.redact import remember_interpolated

    remember_interpolated(key, value)
    return value


# ---- public API -------------------------------------------------------------------------


def load_config(
    config_path: str | Path | None = None, overrides: list[str] | None = None
) -> MasterConfig:
    """Load, validate and return the typed config; warn once about ignored NeMo RL settings.

    `config_path` None means `examples/configs/sft.yaml` of this checkout. `overrides` are
    Hydra-style strings (`sft.max_num_steps=10`, `++a.b=1`, `+a.b=1`, `~a.b`).
    """
    _, cfg = _build(config_path, overrides or [])
    warn_ignored(cfg)
    unmeasured = unmeasured_saves(cfg)
    if unmeasured:
        logger.warning(unmeasured)
    return cfg


def load_config_dict(
    config_path: str | Path | None = None, overrides: list[str] | None = None
) -> DictConfig:
    """The same config as `load_config`, as a resolved, validated OmegaConf `DictConfig`."""
    tree, _ = _build(config_path, overrides or [])
    return tree


def config_to_dict(
    cfg: MasterConfig | DictConfig | dict[str, Any], *, redacted: bool = True
) -> dict[str, Any]:
    """A plain nested dict of `cfg` (secrets replaced by "***" unless `redacted` is False)."""
    data: Any
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        data = dataclasses.asdict(cfg)
    else:
        data = copy.deepcopy(cfg)
    assert isinstance(data, dict)
    return _redact_config(data) if redacted else data


def config_to_yaml(
    cfg: MasterConfig | DictConfig | dict[str, Any], *, redacted: bool = True
) -> str:
    """YAML text of `cfg` that `load_config` reads back to the same config (`--print-config`,
    `step_N/config.yaml`). Secrets are replaced by "***" unless `redacted` is False."""
    return OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg, redacted=redacted)))


def redact_secrets(obj: Any) -> Any:
    """A copy of nested dicts/lists with secret values (`*KEY*`, `*TOKEN*`, `*SECRET*`,
    `*PASSWORD*` names, and values of such environment variables) replaced by "***".

    Data-field names (`input_key`) and token counts (`train_mb_tokens`) are not secrets;
    see `sftkit.log.redact`, which this delegates to.
    """
    # Imported here: `sftkit.log` imports torch (3 s), which loading a config does not need.
    from sftkit.log.redact import redact

    return redact(obj)


def _redact_config(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`redact_secrets` that trusts the schema: a schema field is never a secret by name
    (`moe_token_dispatcher_type` is not a token), so only free-form values (env_vars,
    dataset configs, kwargs) are judged by key name; every string is still scrubbed of
    secret environment values."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        tp = schema_type(path)
        if tp is None:  # not a schema path (a plain dict handed in): judge by name
            out.update(redact_secrets({key: value}))
        elif section_class(tp) is not None and isinstance(value, dict):
            out[key] = _redact_config(value, path + ".")
        else:
            out[key] = redact_secrets(value)
    return out


# ---- pipeline ---------------------------------------------------------------------------


def _build(config_path: str | Path | None, overrides: list[str]) -> tuple[DictConfig, MasterConfig]:
    register_resolvers()
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    tree, sources = read_config_tree(path)
    apply_overrides(tree, overrides, sources, _check_known, key_alias=alias_key)
    tree = rewrite_references(tree)
    _move_flat_dataset_keys(tree, sources)
    check_keys(tree, sources)
    cfg = _merge_into_schema(tree, sources)
    _resolve(cfg, tree, sources)
    try:
        derive(cfg)
    except OmegaConfBaseException as exc:  # a value that does not fit its field
        raise _omegaconf_error(exc, None, {}) from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # a structural problem the steps above missed
        raise _omegaconf_error(exc, tree, sources) from None
    assert isinstance(obj, MasterConfig)
    check_config(obj, sources)
    check_ranges(obj, sources)
    return cfg, obj


def _check_known(path: str, source: str) -> None:
    message = unknown_key_message(path)
    if message:
        raise ConfigError(f"{message} (set in {source})", path=path, source=source)


def read_config_tree(
    path: Path, _chain: tuple[Path, ...] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """Read `path` with its `defaults:` parents merged in (parents first, the file wins).

    Returns the plain tree (interpolations unresolved) and `sources`: dotted key -> the
    file that set it last.
    """
    path = path.expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"Config files include each other through defaults: {cycle}.")
    check_defaults_depth(_chain, path)
    data = _read_yaml(path, _chain[-1] if _chain else None)
    parents = data.pop("defaults", None)
    rename_aliases(data, str(path))
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for parent in _parent_paths(parents, path):
        parent_tree, parent_sources = read_config_tree(parent, (*_chain, path))
        _merge_file(tree, sources, parent_tree, parent_sources)
    own_sources = {key: str(path) for key in _flat_keys(data)}
    _merge_file(tree, sources, data, own_sources)
    return tree, sources


def _read_yaml(path: Path, included_by: Path | None) -> dict[str, Any]:
    origin = f" (listed in defaults of {included_by})" if included_by else ""
    if not path.is_file():
        hint = "" if origin else " Pass an existing file with --config PATH."
        raise ConfigError(f"Config file not found: {path}{origin}.{hint}")
    check_yaml_file(path, origin)  # alias bombs and deep nesting, before OmegaConf expands them
    data: Any
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ConfigError(f"Cannot parse config file {path}{origin}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping of sections, not {type(data).__name__}."
        )
    check_sections(data, path, origin)
    return data


def _parent_paths(parents: Any, path: Path) -> list[Path]:
    if parents is None:
        return []
    items = [parents] if isinstance(parents, str) else parents
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise ConfigError(
            f"'defaults' in {path} must be a path or a list of paths (relative to the file), "
            f"e.g. defaults: ../../sft.yaml; got {parents!r}."
        )
    return [path.parent / p for p in items]  # an absolute p replaces the parent directory


def _merge_file(
    tree: dict[str, Any],
    sources: dict[str, str],
    child: dict[str, Any],
    child_sources: dict[str, str],
) -> None:
    """Deep-merge `child` into `tree` in place: mappings merge, everything else is replaced;
    a child mapping with `_override_: true` replaces the parent's mapping."""
    replaced: list[str] = []
    _deep_merge(tree, child, "", replaced)
    for prefix in replaced:
        for key in [k for k in sources if k.startswith(prefix + ".")]:
            del sources[key]
    sources.update(child_sources)


def _deep_merge(
    base: dict[str, Any], child: dict[str, Any], prefix: str, replaced: list[str]
) -> None:
    for key, value in child.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            override = bool(value.pop(OVERRIDE_MARKER, False))
            if override or not isinstance(base.get(key), dict):
                if override:
                    replaced.append(path)
                base[key] = {}
            _deep_merge(base[key], value, path + ".", replaced)
        elif isinstance(value, list):
            base[key] = [_strip_markers(item) for item in value]
        else:
            base[key] = value


def _strip_markers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_markers(v) for k, v in value.items() if k != OVERRIDE_MARKER}
    if isinstance(value, list):
        return [_strip_markers(v) for v in value]
    return value


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    keys: list[str] = []
    for key, value in node.items():
        if key == OVERRIDE_MARKER:
            continue
        keys.append(f"{prefix}{key}")
        keys.extend(_flat_keys(value, f"{prefix}{key}."))
    return keys


def _move_flat_dataset_keys(tree: dict[str, Any], sources: dict[str, str]) -> None:
    """The seed's flat form puts dataset keys (`data_path`, `input_key`, ...) directly under
    `data`; keep them in `data.extra` so the data pipeline can build a dataset from them."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    for key in [k for k in data if k in DATASET_KEYS and k not in fields]:
        extra = data.get("extra")
        if not isinstance(extra, dict):
            extra = data["extra"] = {}
        extra[key] = data.pop(key)
        if f"data.{key}" in sources:
            sources[f"data.extra.{key}"] = sources.pop(f"data.{key}")


def _merge_into_schema(tree: dict[str, Any], sources: dict[str, str]) -> DictConfig:
    base = OmegaConf.structured(MasterConfig)
    # A free-form mapping the user sets replaces the schema's default mapping rather than
    # merging into it: `optimizer: {name: torch.optim.SGD, kwargs: {lr: 0.1}}` must not
    # inherit AdamW's `betas` (SGD would reject them). Files still merge with each other.
    for path in _free_form_mappings(tree):
        OmegaConf.update(base, path, {}, merge=False)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(tree))
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, tree, sources) from None
    assert isinstance(merged, DictConfig)
    return merged


def _free_form_mappings(node: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths of `node` that hold a mapping in a free-form (dict or Any) schema field."""
    paths: list[str] = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not isinstance(value, dict):
            continue
        tp = schema_type(path)
        if tp is not None and section_class(tp) is not None:
            paths.extend(_free_form_mappings(value, path + "."))
        elif tp is not None:
            paths.append(path)
    return paths


def _resolve(cfg: DictConfig, tree: dict[str, Any], sources: dict[str, str]) -> None:
    """Resolve every `${...}` in place; an error names the key whose interpolation failed."""
    bad = _first_bad_interpolation(cfg, "")
    if bad is not None:
        path, exc = bad
        _, raw = lookup(tree, path)
        source = source_of(sources, path)
        where = f" (set in {source})" if source else ""
        tp = schema_type(path)
        expected = f"; expected {type_name(tp)}" if tp is not None else ""
        detail = str(exc).splitlines()[0]
        raise ConfigError(
            f"Cannot resolve config key '{path}' = {raw!r}{where}: {detail}{expected}.",
            path=path,
            source=source,
        )
    OmegaConf.resolve(cfg)


def _first_bad_interpolation(
    node: DictConfig | ListConfig, prefix: str
) -> tuple[str, OmegaConfBaseException] | None:
    keys: list[Any] = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        path = f"{prefix}{key!s}"
        if OmegaConf.is_interpolation(node, key):
            try:
                node[key]
            except OmegaConfBaseException as exc:
                return path, exc
            continue
        child = node[key]
        if isinstance(child, (DictConfig, ListConfig)):
            found = _first_bad_interpolation(child, path + ".")
            if found is not None:
                return found
    return None


def _omegaconf_error(
    exc: OmegaConfBaseException, tree: dict[str, Any] | None, sources: dict[str, str]
) -> ConfigError:
    """Turn an OmegaConf error into one sentence: key, value, expected type, origin."""
    path = str(getattr(exc, "full_key", "") or "")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    source = source_of(sources, path) if path else None
    where = f" (set in {source})" if source else ""
    tp = schema_type(path) if path else None
    if tp is not None and "interpolation" not in detail.lower():
        value = getattr(exc, "value", None)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=False)
        value_text = f"{value!r} ({type(value).__name__})"
        return ConfigError(
            f"Config key '{path}' has value {value_text}; expected {type_name(tp)}{where}.",
            path=path,
            source=source,
        )
    subject = f"config key '{path}'" if path else "the config"
    return ConfigError(
        f"Invalid value for {subject}{where}: {detail}", path=path or None, source=source
    )


# ---- warnings ---------------------------------------------------------------------------


def warn_ignored(
    cfg: Any,
    root: type = MasterConfig,
    ignored: dict[str, str] | None = None,
    what: str = "sftkit ignores",
) -> None:
    """One warning listing the accepted-but-ignored settings of `cfg` (a `root` instance)
    set to non-default values, each with its value (secrets redacted) and the reason."""
    paths = ignored_settings(cfg, root, ignored)
    if not paths:
        return
    plain = dataclasses.asdict(cfg)
    tree = _redact_config(plain) if root is MasterConfig else redact_secrets(plain)
    lines = []
    for path in paths:
        value: Any = tree
        for seg in path.split("."):
            value = value[seg]
        lines.append(f"  {path}={value!r}: {ignored_reason(path, ignored)}")
    logger.warning(
        "%s %d NeMo RL setting(s) set to non-default values:\n%s",
        what,
        len(paths),
        "\n".join(lines),
    )
