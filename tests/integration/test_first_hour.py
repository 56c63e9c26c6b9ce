"""Paper cuts a new user hits in the first hour: where outputs go without checkpointing,
resumed runs keep one run directory, and adapters load with PEFT alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import exp_dirs, read_metrics

LORA = ("policy.dtensor_cfg.lora_cfg.enabled=true", "policy.dtensor_cfg.lora_cfg.use_triton=false")


def train_steps(exp_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(exp_dir) if "train/loss" in r]


def test_checkpointing_disabled_writes_final_model_into_the_run_dir(
    small_run, tmp_path: Path
) -> None:
    result = small_run.inprocess(
        tmp_path, "sft.max_num_steps=2", "checkpointing.enabled=false", "sft.val_at_end=true",
        "policy.optimizer.kwargs.lr=3e-4", *LORA,
    )  # fmt: skip
    assert result.returncode == 0
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    exp = result.exp_dir
    assert (exp / "final_hf" / "config.json").is_file()
    # What a run leaves behind: the model card's fields come from this run
    card = (exp / "final_hf" / "README.md").read_text()
    val = [r["validation/val_loss"] for r in read_metrics(exp) if "validation/val_loss" in r]
    assert card.startswith("---\nbase_model: ") and "| train | `" in card  # dataset, by name
    assert "| steps trained | 2 |" in card and "lr 0.0003" in card and "rank 8, alpha" in card
    assert f"- `validation/val_loss`: {val[-1]:.4f} (step 2)" in card
    assert "Trained with sftkit 0." in card
    assert (exp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((exp / "final_adapter" / "adapter_config.json").read_text())
    # Something from_pretrained loads without sftkit: the built-in model's directory.
    base = Path(adapter["base_model_name_or_path"])
    assert base.is_absolute() and (base / "config.json").is_file()


@pytest.mark.slow  # a fresh interpreter, so that no sftkit import can help
def test_adapter_loads_with_peft_and_transformers_alone(small_run, tmp_path: Path) -> None:
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=2", *LORA)
    assert result.returncode == 0
    adapter = tmp_path / "ckpt" / "final_adapter"
    code = (
        "import sys, json\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"cfg = json.load(open({str(adapter / 'adapter_config.json')!r}))\n"
        "base = AutoModelForCausalLM.from_pretrained(cfg['base_model_name_or_path'])\n"
        f"model = PeftModel.from_pretrained(base, {str(adapter)!r})\n"
        "assert not [m for m in sys.modules if m.startswith('sftkit')]\n"
        "print('loaded', type(model).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded PeftModel" in out.stdout


def test_resumed_run_continues_the_same_run_directory(small_run, tmp_path: Path) -> None:
    first = small_run.inprocess(tmp_path, "sft.max_num_steps=4")
    assert first.returncode == 0
    exp = first.exp_dir
    # Interrupted after logging step 4 but before saving it: resume from step 3.
    shutil.rmtree(tmp_path / "ckpt" / "step_4")
    shutil.rmtree(tmp_path / "ckpt" / "final_hf")
    second = small_run.inprocess(tmp_path, "sft.max_num_steps=5")
    assert second.returncode == 0
    assert exp_dirs(tmp_path / "logs") == [exp] and second.exp_dir == exp
    assert train_steps(exp) == [1, 2, 3, 4, 5]  # one metrics.jsonl, every step once
    assert sorted(second.train_rows()) == [4, 5]  # what the resumed run logged
    # A new run with another checkpoint directory starts a new exp_NNN.
    other = small_run.inprocess(
        tmp_path, "sft.max_num_steps=1", f"checkpointing.checkpoint_dir={tmp_path / 'c2'}"
    )
    assert other.returncode == 0 and other.exp_dir != exp
