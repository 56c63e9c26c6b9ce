"""`build_model` applies the transforms in its documented order (one process; the
multi-rank order, TP and FSDP2 included, is exercised by tests/integration/test_distributed.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sftkit.config import load_config
from sftkit.dist import DistEnv
from sftkit.model import build


def recording(calls: list[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


def test_one_process_order(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    steps = {
        "load": "load_model",
        "lora": "apply_lora",
        "packed_attention": "enable_packed_attention",
        "activation_checkpointing": "apply_activation_checkpointing",
        "compile": "compile_layers",
    }
    for name, attr in steps.items():
        monkeypatch.setattr(build, attr, recording(calls, name, getattr(build, attr)))
    cfg = load_config(
        None,
        [
            f"policy.model_name={tiny_model_dir}",
            "policy.dtensor_cfg.lora_cfg.enabled=true",
            "policy.sequence_packing.enabled=true",
            "policy.dtensor_cfg.activation_checkpointing=true",
            "policy.dtensor_cfg.compile=true",
            "cluster.device=cpu",
        ],
    )
    model = build.build_model(cfg, DistEnv())
    assert calls == list(steps)
    assert any(".lora_A." in n for n, _ in model.named_parameters())
    assert model.config._attn_implementation == "sftkit_packed"
    assert next(model.parameters()).device == torch.device("cpu")


def test_nothing_optional_is_applied_by_default(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for attr in ("apply_lora", "enable_packed_attention", "apply_activation_checkpointing"):
        monkeypatch.setattr(build, attr, recording(calls, attr, getattr(build, attr)))
    monkeypatch.setattr(build, "compile_layers", recording(calls, "compile", lambda m: 0))
    cfg = load_config(None, [f"policy.model_name={tiny_model_dir}", "cluster.device=cpu"])
    model = build.build_model(cfg, DistEnv())
    assert calls == []
    assert not any(".lora_" in n for n, _ in model.named_parameters())
