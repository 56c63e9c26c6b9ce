"""DoRA through the real entry point: packed rows, LoRA dropout, resume bit-exact, the
merged `final_hf` equal to PEFT on `final_adapter`; FSDP2 on 2 gloo ranks equal to 1 rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import assert_same_losses, assert_same_weights, one_rank, two_ranks
from test_resume import EXACT

DORA = (
    "policy.dtensor_cfg.lora_cfg.enabled=true",
    "policy.dtensor_cfg.lora_cfg.use_dora=true",
    "policy.optimizer.kwargs.lr=0.01",
    "policy.sequence_packing.enabled=true",
    "policy.sequence_packing.train_mb_tokens=128",
)


def assert_final_hf_equals_adapter(ckpt: Path, base: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(ckpt / "final_hf").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                        ckpt / "final_adapter").eval()  # fmt: skip
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
    with torch.no_grad():
        a, b = merged(ids).logits, adapter(ids).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter trained


def test_dora_packed_run_resumes_bit_exact_and_exports(small_run, tiny_model_dir, tmp_path) -> None:
    """LoRA dropout (pre, PEFT's) and attention dropout on: the RNG streams resume too."""
    more = (
        *DORA,
        "policy.dtensor_cfg.lora_cfg.dropout=0.1",
        "policy.dtensor_cfg.lora_cfg.dropout_position=pre",
        "sft.val_period=0",
        "checkpointing.save_period=0",
    )  # fmt: skip (saved at the last step only)
    whole = small_run.inprocess(tmp_path / "whole", *more, "sft.max_num_steps=3")
    part = small_run.inprocess(tmp_path / "part", *more, "sft.max_num_steps=1")
    resumed = small_run.inprocess(tmp_path / "part", *more, "sft.max_num_steps=3")
    assert whole.returncode == part.returncode == resumed.returncode == 0
    ref, got = whole.train_rows(), resumed.train_rows()
    assert sorted(got) == [2, 3]
    for step in got:
        assert {n: got[step][n] for n in EXACT} == {n: ref[step][n] for n in EXACT}, step
    a, b = (
        r.checkpoint_dir / "final_adapter" / "adapter_model.safetensors" for r in (whole, resumed)
    )
    assert a.read_bytes() == b.read_bytes()
    assert_final_hf_equals_adapter(whole.checkpoint_dir, tiny_model_dir)
    # `sftkit export` of the last step, merged and as an adapter, agrees the same way.
    from sftkit.cli import main

    step, out = whole.checkpoint_dir / "step_3", tmp_path / "exported"
    assert main(["export", str(step), str(out / "final_hf")]) == 0
    assert main(["export", str(step), str(out / "final_adapter"), "--adapter"]) == 0
    assert_final_hf_equals_adapter(out, tiny_model_dir)


@pytest.mark.slow
def test_dora_under_fsdp2_matches_one_rank(small_run, tiny_model_dir, tmp_path: Path) -> None:
    more = (*DORA, "checkpointing.save_period=0")
    one = one_rank(small_run, tmp_path / "one", *more)
    two = two_ranks(small_run, tmp_path / "two", *more)
    assert_same_losses(one, two, list(range(1, 7)))
    assert_same_weights(one.checkpoint_dir / "final_adapter", two.checkpoint_dir / "final_adapter")
    assert_same_weights(one.checkpoint_dir / "final_hf", two.checkpoint_dir / "final_hf")
    assert_final_hf_equals_adapter(two.checkpoint_dir, tiny_model_dir)
