"""The tiny Qwen3-MoE (4 experts, top-2, the built-in tokenizer) that the MoE run tests share
(`test_moe_run.py`, `test_expert_parallel.py`)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def write_tiny_qwen3_moe(root: Path) -> Path:
    """Save the model (random weights, seed 0) and tokenizer to `root`; returns `root`."""
    from sftkit.model.builtin import build_tokenizer

    tokenizer = build_tokenizer(384)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, hidden_size=32,
        intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
