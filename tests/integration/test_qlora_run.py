"""QLoRA through the real entry point: packed rows, activation checkpointing, the fused loss,
bit-exact resume, a PEFT adapter for the dense base, a merged `final_hf`, and FSDP2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import assert_same_losses, assert_same_weights, one_rank, two_ranks
from test_resume import EXACT

pytest.importorskip("torchao")
pytestmark = pytest.mark.slow

QLORA = ("policy.dtensor_cfg.lora_cfg.enabled=true", "policy.dtensor_cfg.lora_cfg.use_triton=false",
         "policy.dtensor_cfg.lora_cfg.quantize_base=nf4", "policy.optimizer.kwargs.lr=0.01",
         "++policy.hf_config_overrides.attention_dropout=0.0")  # fmt: skip
# 32 scales per double-quantization block divide every tiny weight's blocks per shard on 1
# and 2 ranks, so both quantize alike (the default picks per shard count: other scales).
SAME_SCALES = "policy.dtensor_cfg.lora_cfg.quantize_scaler_block_size=32"
PACKED_AC = (
    "policy.sequence_packing.enabled=true",
    "policy.dtensor_cfg.activation_checkpointing=true",
)


def test_qlora_packed_checkpointed_resumes_bit_exact_and_exports(small_run, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    from peft import PeftModel
    from torchao.quantization import to_nf4
    from transformers import AutoModelForCausalLM

    whole = small_run.inprocess(tmp_path / "whole", *QLORA, *PACKED_AC, "sft.max_num_steps=4")
    part = small_run.inprocess(tmp_path / "part", *QLORA, *PACKED_AC, "sft.max_num_steps=2")
    resumed = small_run.inprocess(tmp_path / "part", *QLORA, *PACKED_AC, "sft.max_num_steps=4")
    assert whole.returncode == part.returncode == resumed.returncode == 0
    ref, got = whole.train_rows(), resumed.train_rows()
    assert sorted(got) == [3, 4]
    for step in got:
        assert {n: got[step][n] for n in EXACT} == {n: ref[step][n] for n in EXACT}, step
    assert ref[4]["train/loss"] < ref[1]["train/loss"]
    # the adapter loads in PEFT on the dense base; final_hf merged into the dequantized base
    adapter = whole.checkpoint_dir / "final_adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(peft.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight,
                       saved[key])  # fmt: skip
    assert saved[key].abs().sum() > 0
    merged = load_file(str(whole.checkpoint_dir / "final_hf" / "model.safetensors"))
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    a, b = saved[f"base_model.model.{name}.lora_A.weight"], saved[key]
    nf4 = to_nf4(dense[f"{name}.weight"].float(), 64, 256).to(torch.float32)
    expected = nf4 + 4.0 * b @ a  # scale = alpha 32 / dim 8
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(
        merged["model.embed_tokens.weight"], dense["model.embed_tokens.weight"].float()
    )


def test_qlora_under_fsdp2_matches_one_rank(small_run, tmp_path: Path) -> None:
    one = one_rank(small_run, tmp_path / "one", *QLORA, SAME_SCALES, "checkpointing.save_period=0")
    two = two_ranks(small_run, tmp_path / "two", *QLORA, SAME_SCALES, "checkpointing.save_period=0")
    assert_same_losses(one, two, list(range(1, 7)))
    assert_same_weights(one.checkpoint_dir / "final_adapter", two.checkpoint_dir / "final_adapter")
    assert_same_weights(one.checkpoint_dir / "final_hf", two.checkpoint_dir / "final_hf")
