"""Bounds on reading config files and overrides, each refused in one line naming the file.

Config files are untrusted input too: `sftkit export` reads a checkpoint's `config.yaml`.
Without these bounds a 395-byte YAML alias bomb expanded to 10^5 nodes in 41 s (10^6 in
over 120 s), a `defaults:` chain 2,000 files deep and an override with 3,000 nested
brackets ended in `RecursionError` tracebacks, and `defaults: /etc/passwd` printed the
file's content inside an "Unknown config key" error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sftkit.config.errors import ConfigError

MAX_ALIAS_NODES = 10_000  # nodes that aliases may add when expanded (a config uses ~100)
MAX_DEPTH = 64  # nesting of mappings and lists in one file or override (configs use ~8)
MAX_DEFAULTS_DEPTH = 32  # files in one `defaults:` chain (NeMo RL recipes use 2)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: no Python recursion
_SECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class _TooDeep(Exception):
    pass


def check_yaml_file(path: Path, origin: str = "") -> None:
    """Refuse a YAML file nested deeper than `MAX_DEPTH` or whose aliases expand to more
    than `MAX_ALIAS_NODES` extra nodes, before it is loaded (aliases stay shared here)."""
    too_deep = ConfigError(
        f"Config file {path}{origin} nests mappings and lists (or aliases of them) more than "
        f"{MAX_DEPTH} levels deep; flatten it."
    )
    try:
        root = yaml.compose(path.read_text(), Loader=_LOADER)
    except RecursionError:  # the pure-Python composer
        raise too_deep from None
    except yaml.YAMLError as exc:  # libyaml stops at 1,000 levels; others: the loader reports
        if "nesting depth" in str(exc):
            raise too_deep from None
        return
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path}{origin} is not a UTF-8 text file.") from None
    if root is None:
        return
    memo: dict[int, tuple[int, int]] = {}
    try:
        expanded, _ = _measure(root, 0, memo)
    except _TooDeep:
        raise too_deep from None
    if expanded - len(memo) > MAX_ALIAS_NODES:
        raise ConfigError(
            f"Config file {path}{origin} uses YAML aliases (*name) that expand to "
            f"{expanded:,} nodes, over the budget of {MAX_ALIAS_NODES:,} added by aliases; "
            "write the repeated sections out, or use fewer aliases."
        )


def _measure(node: yaml.Node, depth: int, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(expanded node count, height) of `node`, each shared node measured once."""
    if depth > MAX_DEPTH:
        raise _TooDeep
    known = memo.get(id(node))
    if known is None:
        children: list[Any] = []
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        size, height = 1, 0
        for child in children:
            child_size, child_height = _measure(child, depth + 1, memo)
            size += child_size
            height = max(height, child_height + 1)
        known = memo[id(node)] = (size, height)
    if depth + known[1] > MAX_DEPTH:
        raise _TooDeep
    return known


def check_sections(data: dict[Any, Any], path: Path, origin: str = "") -> None:
    """A config's top level holds section names; anything else (a file such as /etc/passwd
    listed in `defaults:`) is refused naming the file, never echoing its content."""
    odd = [key for key in data if not (isinstance(key, str) and _SECTION.fullmatch(key))]
    if odd:
        raise ConfigError(
            f"Config file {path}{origin} is not a config: {len(odd)} of its top-level keys are "
            "not section names (such as policy, data, sft); check the path."
        )


def check_defaults_depth(chain: tuple[Path, ...], path: Path) -> None:
    """Refuse a `defaults:` chain longer than `MAX_DEFAULTS_DEPTH` files."""
    if len(chain) >= MAX_DEFAULTS_DEPTH:
        raise ConfigError(
            f"Config file {path} is reached through {len(chain)} levels of defaults: (from "
            f"{chain[0]}); at most {MAX_DEFAULTS_DEPTH} are read. Shorten the chain."
        )


def check_override_depth(text: str) -> None:
    """Refuse an override value nested more than `MAX_DEPTH` brackets deep."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        shown = text if len(text) <= 60 else text[:40] + "..."
        raise ConfigError(
            f"Invalid override '{shown}': its value nests {deepest} brackets deep; at most "
            f"{MAX_DEPTH} are read.",
            source=f"override '{shown}'",
        )
