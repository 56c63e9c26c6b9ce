"""Hydra-style command-line overrides on a plain config tree.

Syntax (as in Hydra and NeMo RL): `a.b=v` sets, `++a.b=v` adds or sets, `+a.b=v` adds (an
error if the key is already set), `~a.b` deletes (`~a.b=v` only if the value is v).
Values parse like Hydra's: `null`, `true`/`false`, ints, floats (`1e-5`, `inf`), quoted
strings, lists `[1, 2]`, dicts `{a: 1}`, `${...}` interpolations; anything else is a
string. Leading zeros keep a value a string (`007`, `00:03:30:00`), as in Hydra.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from sftkit.config.errors import ConfigError
from sftkit.config.limits import check_override_depth

Op = Literal["set", "add", "force", "delete"]

_KEY = re.compile(r"[A-Za-z_][\w\-]*(\.[\w\-]+)*")
_INT = re.compile(r"[+-]?(0|[1-9](_?\d)*)")
_DIGITS = r"\d(_?\d)*"
_FLOAT = re.compile(
    rf"[+-]?(((({_DIGITS})?\.{_DIGITS}|{_DIGITS}\.)([eE][+-]?{_DIGITS})?)"
    rf"|({_DIGITS}[eE][+-]?{_DIGITS})|inf|nan)",
    re.IGNORECASE,
)
_OPEN = {"[": "]", "{": "}", "(": ")"}


@dataclass(frozen=True)
class Override:
    """One parsed override: `text` as given, the operation, the dotted key and the value."""

    text: str
    op: Op
    key: str
    value: Any = None
    has_value: bool = True


def parse_override(text: str) -> Override:
    """Parse `a.b=v`, `++a.b=v`, `+a.b=v`, `~a.b` or `~a.b=v`; ConfigError names the override."""
    check_override_depth(text)  # parse_value recurses per bracket
    body, op = _split_op(text.strip())
    key, sep, raw = body.partition("=")
    key = key.strip()
    if not _KEY.fullmatch(key):
        raise ConfigError(
            f"Invalid override '{text}': expected key=value, ++key=value, +key=value or ~key "
            "with a dotted key such as sft.max_num_steps=10.",
            source=f"override '{text}'",
        )
    if not sep and op != "delete":
        raise ConfigError(
            f"Invalid override '{text}': missing '=value'. Write {key}=<value>, or ~{key} "
            "to delete the key.",
            path=key,
            source=f"override '{text}'",
        )
    try:
        value = parse_value(raw) if sep else None
    except ValueError as exc:
        raise ConfigError(
            f"Invalid override '{text}': {exc}. Quote the value if it is a plain string, "
            f"e.g. {key}='...'.",
            path=key,
            source=f"override '{text}'",
        ) from None
    return Override(text=text, op=op, key=key, value=value, has_value=bool(sep))


def _split_op(text: str) -> tuple[str, Op]:
    if text.startswith("~"):
        return text[1:], "delete"
    if text.startswith("++"):
        return text[2:], "force"
    if text.startswith("+"):
        return text[1:], "add"
    return text, "set"


def parse_value(text: str) -> Any:
    """Parse one override value the way Hydra does (see the module docstring)."""
    text = text.strip()
    if not text:
        return ""
    first, last = text[0], text[-1]
    if first in "[{" and not text.startswith("${"):
        if last != _OPEN[first]:
            raise ValueError(f"unbalanced '{first}' in {text!r}")
        inner = text[1:-1].strip()
        items = _split_top(inner, ",") if inner else []
        if first == "[":
            return [parse_value(item) for item in items]
        return dict(_parse_entry(item) for item in items)
    if len(text) >= 2 and first in "'\"" and last == first:
        return text[1:-1].replace("\\" + first, first)
    lowered = text.lower()
    if lowered == "null":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(text):
        return int(text.replace("_", ""))
    if _FLOAT.fullmatch(text):
        return float(text.replace("_", ""))
    _split_top(text, ",")  # rejects unbalanced quotes and brackets in plain strings
    return text


def _parse_entry(item: str) -> tuple[str, Any]:
    parts = _split_top(item, ":", maxsplit=1)
    if len(parts) != 2:
        raise ValueError(f"expected key: value in dict entry {item!r}")
    key = parse_value(parts[0])
    return str(key), parse_value(parts[1])


def _split_top(text: str, sep: str, maxsplit: int = -1) -> list[str]:
    """Split at `sep` outside quotes and brackets; ValueError when those do not balance."""
    parts: list[str] = []
    stack: list[str] = []
    quote: str | None = None
    start = 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise ValueError(f"unbalanced '{ch}' in {text!r}")
        elif ch == sep and not stack and maxsplit != len(parts):
            parts.append(text[start:i])
            start = i + 1
    if quote or stack:
        raise ValueError(f"unclosed {quote or stack[-1]!r} in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def apply_overrides(
    tree: dict[str, Any],
    overrides: list[str],
    sources: dict[str, str],
    check_known: Callable[[str, str], None],
    key_alias: Callable[[str], str] | None = None,
) -> None:
    """Apply `overrides` in order to the plain `tree`, recording each one in `sources`.

    `check_known(path, source)` raises ConfigError for a key the schema does not know; it
    is called where an override refers to a key that the files did not set. `key_alias`
    maps another spelling of a key (`policy.automodel_cfg.x`) to the schema's.
    """
    for text in overrides:
        override = parse_override(text)
        if key_alias is not None:
            override = replace(override, key=key_alias(override.key))
        source = f"override '{text}'"
        found, current = lookup(tree, override.key)
        if override.op == "delete":
            if not found:
                check_known(override.key, source)  # a known key left at its default: no-op
                continue
            if override.has_value and current != override.value:
                raise ConfigError(
                    f"Cannot apply {source}: '{override.key}' is {current!r}, not "
                    f"{override.value!r}. Use ~{override.key} to delete it whatever its value.",
                    path=override.key,
                    source=source,
                )
            _delete(tree, override.key, source)
        else:
            if override.op == "add" and found:
                raise ConfigError(
                    f"Cannot apply {source}: '{override.key}' is already set (to {current!r}). "
                    f"Use {override.key}=... or ++{override.key}=... to change it.",
                    path=override.key,
                    source=source,
                )
            _assign(tree, override.key, override.value, source)
        _forget_sources(sources, override.key)
        sources[override.key] = source


def _segments(key: str) -> list[str]:
    return key.split(".")


def _child(node: Any, seg: str) -> tuple[bool, Any]:
    if isinstance(node, dict):
        return (seg in node), node.get(seg)
    if isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
        return True, node[int(seg)]
    return False, None


def lookup(tree: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(True, value) for a dotted key of a plain tree (digits index lists), else (False, None)."""
    node: Any = tree
    for seg in _segments(key):
        found, node = _child(node, seg)
        if not found:
            return False, None
    return True, node


def _assign(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    *parents, last = _segments(key)
    node: Any = tree
    for depth, seg in enumerate([*parents, last]):
        is_last = depth == len(parents)
        if isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
            if is_last:
                node[int(seg)] = value
            node = node[int(seg)]
        elif isinstance(node, dict):
            if is_last:
                node[seg] = value
            elif node.get(seg) is None:
                node[seg] = {}  # create the section (or fill a null one), as Hydra's ++ does
            node = node[seg]
        else:
            where = ".".join(parents[:depth]) or "the config root"
            raise ConfigError(
                f"Cannot apply {source}: '{where}' holds {node!r}, which has no key '{seg}'. "
                f"Set the whole value instead, e.g. {where}={{{seg}: ...}}.",
                path=key,
                source=source,
            )


def _delete(tree: dict[str, Any], key: str, source: str) -> None:
    *parents, last = _segments(key)
    _, parent = lookup(tree, ".".join(parents)) if parents else (True, tree)
    if isinstance(parent, dict):
        del parent[last]
    else:
        del parent[int(last)]


def _forget_sources(sources: dict[str, str], key: str) -> None:
    for path in [p for p in sources if p.startswith(key + ".")]:
        del sources[path]
