"""Retention by metric, save_period, save_optimizer, save_consolidated and `sftkit export`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from sftkit.checkpoint import layout as ckpt


def saved_steps(work: Path) -> list[int]:
    return sorted(step for step, _ in ckpt.step_dirs(work / "ckpt"))


@pytest.mark.parametrize("higher", [False, True])
def test_keep_top_k_by_train_metric(small_run, reference_run, tmp_path: Path, higher: bool) -> None:
    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=8", "checkpointing.save_period=2",
        "checkpointing.keep_top_k=2", "checkpointing.metric_name=train:grad_norm",
        f"checkpointing.higher_is_better={str(higher).lower()}",
    )  # fmt: skip
    assert result.returncode == 0
    norms = {s: r["train/grad_norm"] for s, r in result.train_rows().items() if s % 2 == 0}
    best = sorted(norms, key=lambda s: (-norms[s] if higher else norms[s], -s))[:2]
    assert saved_steps(tmp_path) == sorted({*best, 8})
    for step in saved_steps(tmp_path):
        info = ckpt.read_info(tmp_path / "ckpt" / f"step_{step}")
        assert info["train:grad_norm"] == norms[step]


def test_keep_top_k_by_val_loss(small_run, tmp_path: Path) -> None:
    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=8", "sft.val_period=2", "checkpointing.save_period=2",
        "checkpointing.keep_top_k=1", "checkpointing.metric_name=val:val_loss",
    )  # fmt: skip
    assert result.returncode == 0
    vals = result.val_rows()
    assert sorted(vals) == [2, 4, 6, 8]
    best = min(vals, key=lambda s: (vals[s], -s))
    assert saved_steps(tmp_path) == sorted({best, 8})


def test_save_optimizer_false_resumes_with_a_fresh_optimizer(
    small_run, tmp_path: Path, caplog
) -> None:
    first = small_run.inprocess(
        tmp_path, "sft.max_num_steps=2", "checkpointing.save_optimizer=false"
    )
    assert first.returncode == 0
    assert not (tmp_path / "ckpt" / "step_2" / "policy" / "optimizer").exists()
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        second = small_run.inprocess(
            tmp_path, "sft.max_num_steps=3", "checkpointing.save_optimizer=false"
        )
    assert second.returncode == 0 and sorted(second.train_rows()) == [3]
    assert "no optimizer state" in caplog.text


def test_save_consolidated_and_export(small_run, reference_run, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sftkit.cli import main

    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=1", "checkpointing.save_consolidated=true"
    )
    assert result.returncode == 0
    step = tmp_path / "ckpt" / "step_1"
    consolidated = AutoModelForCausalLM.from_pretrained(step / "policy" / "consolidated")
    weights = load_file(step / "policy" / "weights" / "model.safetensors")
    state = consolidated.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k in state)
    assert ckpt.verify(step) is None  # the consolidated files are in the manifest too

    out = tmp_path / "exported"
    assert main(["export", str(reference_run.checkpoint_dir / "step_14"), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    ref = load_file(reference_run.checkpoint_dir / "step_14" / "policy/weights/model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in ref.items() if k in exported)
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (
        out / "tokenizer_config.json"
    ).read_text()
    assert main(["export", str(step), str(tmp_path / "x"), "--adapter"]) == 2  # full run

    # NeMo RL's converter command, as its docs write it, gives the same model.
    converter = _load_script("examples/converters/convert_dcp_to_hf.py")
    step_14 = reference_run.checkpoint_dir / "step_14"
    args = ["--config", str(step_14 / "config.yaml"), "--dcp-ckpt-path",
            str(step_14 / "policy" / "weights"), "--hf-ckpt-path", str(tmp_path / "hf")]  # fmt: skip
    assert converter.main(args) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(converted[k], v) for k, v in exported.items())
    assert converter.main(["--dcp-ckpt-path", str(tmp_path), "--hf-ckpt-path", "y"]) == 2


def _load_script(relative: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_export_merged_and_adapter(small_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftkit.cli import main

    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=2", "policy.dtensor_cfg.lora_cfg.enabled=true",
        "policy.dtensor_cfg.lora_cfg.use_triton=false",
        "++policy.hf_config_overrides.attention_dropout=0.0",
    )  # fmt: skip
    assert result.returncode == 0
    step = tmp_path / "ckpt" / "step_2"
    assert main(["export", str(step), str(tmp_path / "merged")]) == 0
    assert main(["export", str(step), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        a, b = merged(ids).logits, peft(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits)
