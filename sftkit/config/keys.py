"""`sftkit keys [prefix]`: every config key with its type, default, doc (the schema's field
metadata, `sftkit.config.keydoc.doc`), whether NeMo RL has it, and what sftkit does with it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING
from typing import Any, NamedTuple

from sftkit.config.compat import MEGATRON_HONOURED
from sftkit.config.schema import CHOICES, DERIVED_DEFAULTS, IGNORED_KEYS, MasterConfig


class KeyDoc(NamedTuple):
    """One documented config key, as `sftkit keys` prints it."""

    path: str
    type: str
    default: str
    doc: str
    nemo: bool  # NeMo RL's key (False: sftkit's own)
    note: str  # allowed values, where the default comes from, or why sftkit ignores it


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def key_docs(prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema at or below `prefix` (a dotted path), in schema order."""

    def ignored(path: str) -> str | None:
        if path in MEGATRON_HONOURED:
            return "read only when policy.megatron_cfg.enabled: translated to sftkit's"
        parts = path.split(".")
        return next(
            (IGNORED_KEYS[p] for end in range(len(parts), 0, -1)
             if (p := ".".join(parts[:end])) in IGNORED_KEYS),
            None,
        )  # fmt: skip

    rows: list[KeyDoc] = []

    def walk(cls: type, base: str) -> None:
        for f in dataclasses.fields(cls):
            path = f"{base}{f.name}"
            value = _default(f)
            if dataclasses.is_dataclass(value):
                walk(type(value), path + ".")
                continue
            notes = []
            if path in CHOICES:
                notes.append("one of " + ", ".join(CHOICES[path]))
            if path in DERIVED_DEFAULTS:
                notes.append(f"null means {DERIVED_DEFAULTS[path]}")
            reason = ignored(path)
            if reason is not None and path in MEGATRON_HONOURED:
                notes.append(reason)
            elif reason is not None:
                notes.append(f"sftkit ignores it: {reason}")
            shown = _show(value)
            rows.append(
                KeyDoc(path, str(f.type), shown, f.metadata.get("doc", ""),
                       f.metadata.get("nemo", True), "; ".join(notes))
            )  # fmt: skip

    walk(MasterConfig, "")
    if not prefix:
        return rows
    return [r for r in rows if r.path == prefix or r.path.startswith(prefix.rstrip(".") + ".")]


def format_keys(rows: list[KeyDoc]) -> str:
    """The `sftkit keys` listing: one key a block, what it does, where it comes from."""
    out = []
    for r in rows:
        origin = "NeMo RL key" if r.nemo else "sftkit only"
        out.append(f"{r.path}: {r.type} = {r.default}  [{origin}]")
        out.append(f"    {r.doc}")
        if r.note:
            out.append(f"    {r.note}")
    return "\n".join(out)
