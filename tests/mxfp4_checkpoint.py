"""A tiny gpt-oss checkpoint with MXFP4 experts, encoded from known weights independently of
sftkit and transformers (tests/unit/model/test_model_mxfp4.py, tests/integration/
test_quantized_base.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The FP4 (E2M1) values by 4-bit code, as the OCP MX spec lists them.
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def encode_mxfp4(shape: torch.Size, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Known weights [E, in, out] (as transformers' experts hold them) and their MXFP4
    blocks [E, out, in/32, 16] and scales [E, out, in/32], written independently of sftkit."""
    experts, d_in, d_out = shape
    codes = torch.randint(0, 16, (experts, d_out, d_in), generator=gen)
    exponents = torch.randint(-3, 2, (experts, d_out, d_in // 32), generator=gen)
    values = E2M1[codes] * torch.pow(2.0, exponents.repeat_interleave(32, -1).float())
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # the even value in the low nibble
    blocks = packed.to(torch.uint8).reshape(experts, d_out, d_in // 32, 16)
    return values.transpose(1, 2).contiguous(), blocks, (exponents + 127).to(torch.uint8)


def write_mxfp4_gpt_oss(directory: Path, **tokens: int) -> dict[str, torch.Tensor]:
    """A tiny gpt-oss checkpoint with MXFP4 experts; returns every weight it stands for.
    `tokens`: vocab_size, pad_token_id, ... of the tokenizer a run pairs it with."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        **{"vocab_size": 64, **tokens}, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    GptOssForCausalLM(config).save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    known = dict(weights)
    gen = torch.Generator().manual_seed(1)
    for key in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        known[key], weights[f"{key}_blocks"], weights[f"{key}_scales"] = encode_mxfp4(
            weights.pop(key).shape, gen
        )
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((directory / "config.json").read_text())
    meta["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (directory / "config.json").write_text(json.dumps(meta))
    return known
