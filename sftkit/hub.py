"""Hugging Face Hub reachability: offline runs fail in seconds, not after a minute of retries.

huggingface_hub retries each request with backoff (about 25 s per file), so an offline run
that names a hub model spent a minute or more before its error. `offline_if_unreachable`
probes the hub once (a TCP connect, `PROBE_TIMEOUT_S`) when the config names something that
may come from it; when the hub cannot be reached it switches huggingface_hub, transformers
and datasets to their offline mode, so cached files still load and missing ones fail at once
with the usual one-line error.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # annotations only: this module imports nothing from sftkit at run time
    from sftkit.config import MasterConfig

logger = logging.getLogger("sftkit")

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the user (or an earlier probe) put the hub in offline mode."""
    return any(
        os.environ.get(var, "").lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (`HF_ENDPOINT`) opens within `timeout`."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def set_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets, also if already imported."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
        ds_config.HF_DATASETS_OFFLINE = True  # type: ignore[attr-defined]


def may_use_hub(names: Iterable[str | None]) -> bool:
    """Whether any of `names` (model, tokenizer or dataset ids) may be fetched from the hub:
    not a built-in `sftkit:` model and not an existing local path."""
    for name in names:
        if not name or name.startswith("sftkit:"):
            continue
        if not Path(name).expanduser().exists():
            return True
    return False


def _dataset_names(entries: Any) -> list[str | None]:
    if entries is None:
        return []
    items = entries if isinstance(entries, list) else [entries]
    names: list[str | None] = []
    for entry in items:
        if not hasattr(entry, "get"):
            continue
        path = entry.get("data_path") or entry.get("train_data_path")
        # A dataset without a local file is a built-in or hub dataset (squad, tulu3, ...).
        names.append(str(path) if path else str(entry.get("dataset_name") or "hub"))
    return names


def offline_if_unreachable(cfg: MasterConfig) -> bool:
    """Probe the hub once when `cfg` may need it; offline mode if it is
    unreachable. Returns True when it switched to offline mode."""
    if hub_offline():
        return False
    data = cfg.data
    flat = data.flat_dataset()
    names = [
        cfg.policy.model_name,
        cfg.policy.tokenizer.name,
        *_dataset_names(data.train),
        *_dataset_names(data.validation),
        *_dataset_names(flat),
    ]
    if not may_use_hub(names) or hub_reachable():
        return False
    set_offline()
    logger.info("The Hugging Face Hub is unreachable: using only locally cached files.")
    return True
