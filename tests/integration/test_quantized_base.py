"""A gpt-oss checkpoint with MXFP4 experts trains with `policy.dequantize_base_checkpoint:
true` (NeMo RL's gpt-oss recipes set it) on one process and on 2 ranks, from the same
dequantized weights, and exports full-precision experts with a config that says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SmallRun
from mxfp4_checkpoint import write_mxfp4_gpt_oss

STEPS = ("sft.max_num_steps=3", "sft.val_period=0", "policy.train_micro_batch_size=4",
         "++policy.hf_config_overrides.attention_dropout=0.0")  # fmt: skip


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sftkit.model.builtin import build_tokenizer

    root = tmp_path_factory.mktemp("gpt_oss_mxfp4_run")
    tokenizer = build_tokenizer(384)
    write_mxfp4_gpt_oss(root, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=None)  # fmt: skip
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.slow
def test_mxfp4_base_trains_on_one_and_two_ranks(
    small_run: SmallRun, mxfp4_model: Path, tmp_path: Path
) -> None:
    model = (f"policy.model_name={mxfp4_model}", "policy.dequantize_base_checkpoint=true")
    one = small_run.inprocess(tmp_path / "one", *model, *STEPS)
    assert one.returncode == 0
    two = small_run.subprocess(tmp_path / "two", *model, *STEPS, "cluster.gpus_per_node=2",
                               "cluster.device=cpu", timeout=400)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    # The same dequantized start on both paths: the first step's loss agrees.
    loss_one, loss_two = (run.train_rows()[1]["train/loss"] for run in (one, two))
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    exported = json.loads((one.checkpoint_dir / "final_hf" / "config.json").read_text())
    assert "quantization_config" not in exported


@pytest.mark.slow
def test_mxfp4_base_without_the_key_stops_in_one_line(
    small_run: SmallRun, mxfp4_model: Path, tmp_path: Path
) -> None:
    result = small_run.subprocess(tmp_path, f"policy.model_name={mxfp4_model}", *STEPS)
    assert result.returncode == 2
    assert "set policy.dequantize_base_checkpoint=true" in result.stderr
    assert "Traceback" not in result.stderr
