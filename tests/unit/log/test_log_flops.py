"""Peak FLOPs per device and MFU, checked against docs/perf.md's measured rows."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.log import (
    active_matmul_params,
    device_peak_flops,
    flops_per_token,
    matmul_params,
    mfu,
    peak_flops,
)

LLAMA_1B = LlamaConfig(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    vocab_size=128256,
    tie_word_embeddings=True,
)
LLAMA_8B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM2e", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GB200", 2500e12),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_peak_flops(name: str, peak: float | None) -> None:
    assert peak_flops(name) == peak


def test_no_peak_on_cpu() -> None:
    assert device_peak_flops("cpu") is None
    if not torch.cuda.is_available():
        assert device_peak_flops() is None


@pytest.mark.parametrize(
    ("config", "tokens_per_s", "lora", "expected_mfu"),
    [
        (LLAMA_1B, 49_060, False, 0.408),  # full FT, plain HF loop
        (LLAMA_1B, 62_729, False, 0.521),  # + Liger
        (LLAMA_1B, 36_668, True, 0.203),  # PEFT LoRA r16
        (LLAMA_8B, 8_735, True, 0.284),  # 8B LoRA r16
    ],
)
def test_mfu_reproduces_perf_md(config, tokens_per_s: int, lora: bool, expected_mfu: float) -> None:
    value = mfu(tokens_per_s, flops_per_token(config, 4096, lora=lora), peak_flops("NVIDIA H200"))
    assert value == pytest.approx(expected_mfu, abs=0.0006)


def test_causal_flops_per_token_for_8b() -> None:
    # docs/perf.md: Llama-3.1-8B is 48.2 GF/token at S = 4096 and 51.5 at S = 8192 (causal).
    assert flops_per_token(LLAMA_8B, 4096) / 1e9 == pytest.approx(48.2, abs=0.05)
    assert flops_per_token(LLAMA_8B, 8192) / 1e9 == pytest.approx(51.5, abs=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_match_a_real_model(tied: bool) -> None:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    # Every Linear, the head included even when its weight is the embedding's: it still runs.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert matmul_params(config) == linear
    assert active_matmul_params(model) == linear  # counted on the model: the same N
    assert flops_per_token(config, 16, n_params=1000) == 6 * 1000 + 6 * 2 * 4 * 8 * 16


def test_mfu_unknown_peak_and_unparseable_config() -> None:
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 1e12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n_params"):
        matmul_params(object())
