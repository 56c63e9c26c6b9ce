"""Refuse a model config that cannot fit before anything is allocated.

A config with `num_hidden_layers=10**7`, `hidden_size=10**9` or `vocab_size=2**40` (in a
model directory or through `policy.hf_config_overrides`) gave no output for 150 s, or
allocator tracebacks. The parameter count is estimated from the config's shapes; the
weights alone (2 bytes per parameter, the smallest training dtype, split over the ranks)
must fit in this rank's share of memory (its GPU, plus its share of the host's available
RAM). The bound is loose on purpose: it refuses the impossible, never a model that fits.
"""

from __future__ import annotations

import os
from typing import Any

import torch

MAX_LAYERS = 10_000  # real decoders have <= ~200; building 10^7 layer modules alone takes hours
MIN_BYTES_PER_PARAM = 2


def _int(config: Any, name: str, default: int = 0) -> int:
    value = getattr(config, name, None)
    return (
        int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    )


def estimate_parameters(config: Any) -> int:
    """Parameters of a decoder described by an HF config (embeddings, attention, MLP or
    experts, head); a lower-bound estimate, exact enough to tell GB from TB."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    hidden = _int(text, "hidden_size")
    layers = _int(text, "num_hidden_layers")
    vocab = _int(text, "vocab_size")
    heads = max(_int(text, "num_attention_heads", 1), 1)
    kv_heads = _int(text, "num_key_value_heads", heads) or heads
    head_dim = _int(text, "head_dim") or hidden // heads
    inner = _int(text, "intermediate_size") or 4 * hidden
    experts = max(_int(text, e) for e in ("num_experts", "num_local_experts", "n_routed_experts"))
    if experts:  # routed experts, shared experts (Qwen2-MoE, DeepSeek) and the router
        expert = _int(text, "moe_intermediate_size") or inner
        shared = _int(text, "shared_expert_intermediate_size") or (
            _int(text, "n_shared_experts") * expert
        )
        inner = expert * experts + shared + experts // 3
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    embeddings = vocab * hidden * (1 if getattr(text, "tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + 3 * hidden * inner)


def _host_available() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the host's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_bytes() -> int:
    """This rank's share of memory: its GPU's (when CUDA is present) plus its share of the
    host's available RAM (ranks on one host split it)."""
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    total = _host_available() // local
    if torch.cuda.is_available():
        total += torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return total


def check_model_size(config: Any, model_name: str) -> None:
    """ValueError in one line when `config` cannot fit (see the module docstring)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = ", ".join(
        f"{k}={getattr(text, k)}"
        for k in ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size")
        if hasattr(text, k)
    )
    where = f"policy.model_name={model_name!r} (with policy.hf_config_overrides)"
    layers = _int(text, "num_hidden_layers")
    if layers > MAX_LAYERS:
        raise ValueError(
            f"{where}: num_hidden_layers={layers} is over {MAX_LAYERS:,}; check the model's "
            "config.json and policy.hf_config_overrides"
        )
    params = estimate_parameters(config)
    shards = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    needed = params * MIN_BYTES_PER_PARAM // shards
    have = available_bytes()
    if needed > have:
        raise ValueError(
            f"{where}: its config ({shape}) describes about {params:.2e} parameters, at least "
            f"{needed / 2**30:,.0f} GiB per rank for the weights alone, more than the "
            f"{have / 2**30:,.0f} GiB this rank has; check the model's config.json and "
            "policy.hf_config_overrides"
        )
