"""Tiny random-init configs of every model family the suite trains (2 layers, hidden 48),
one per family the installed transformers has: `test_model_families.py`'s matrix."""

from __future__ import annotations

from typing import Any

import transformers

WINDOW = 6  # tokens; the addition examples are ~20 tokens, so the window matters


def tiny_configs(vocab: int, pad: int, eos: int) -> dict[str, Any]:
    """One small config per family the installed transformers has (name -> config)."""
    common = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=None)
    shape = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, **common)  # fmt: skip
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    wanted: dict[str, tuple[str, dict[str, Any]]] = {
        "llama": ("LlamaConfig", dict(shape, tie_word_embeddings=False)),
        "qwen2": ("Qwen2Config", dict(shape, tie_word_embeddings=True)),
        "qwen3": ("Qwen3Config", dict(shape, head_dim=16, tie_word_embeddings=True)),
        "mistral": ("MistralConfig", dict(shape, sliding_window=WINDOW, tie_word_embeddings=False)),
        "gemma": ("GemmaConfig", dict(shape, head_dim=12, tie_word_embeddings=True)),
        # Small caps and larger weights: dropping either softcap moves logits by > 0.4.
        "gemma2": (
            "Gemma2Config",
            dict(
                shape,
                head_dim=12,
                sliding_window=WINDOW,
                attn_logit_softcapping=1.0,
                final_logit_softcapping=2.0,
                query_pre_attn_scalar=12,
                initializer_range=0.1,
                tie_word_embeddings=True,
            ),
        ),
        "phi3": ("Phi3Config", dict(shape, tie_word_embeddings=False)),
        "granite": (
            "GraniteConfig",
            dict(
                shape,
                logits_scaling=4.0,
                embedding_multiplier=3.0,
                residual_multiplier=0.5,
                attention_multiplier=0.2,
                tie_word_embeddings=True,
            ),
        ),
        "olmo2": ("Olmo2Config", dict(shape, tie_word_embeddings=False)),
        "gpt2": (
            "GPT2Config",
            dict(
                n_embd=48,
                n_layer=2,
                n_head=4,
                n_positions=256,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **common,
            ),
        ),
        # Mixture-of-experts: 4 experts, 2 per token (Llama 4: 1), fused expert weights.
        "qwen3_moe": ("Qwen3MoeConfig", dict(shape, head_dim=16, **moe)),
        "mixtral": ("MixtralConfig", dict(shape, num_local_experts=4, num_experts_per_tok=2)),
        "olmoe": ("OlmoeConfig", dict(shape, **moe)),
        # Sinks (one logit per head) and alternating sliding / full layers.
        "gpt_oss": (
            "GptOssConfig",
            dict(
                shape,
                head_dim=16,
                intermediate_size=32,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"],
            ),
        ),  # fmt: skip
        # MLA: value heads (12) narrower than query/key heads (8 + 8); one dense layer first.
        "deepseek_v3": (
            "DeepseekV3Config",
            dict(
                shape,
                num_key_value_heads=4,
                n_routed_experts=4,
                n_shared_experts=1,
                first_k_dense_replace=1,
                kv_lora_rank=16,
                q_lora_rank=24,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                n_group=1,
                topk_group=1,
                **moe,
            ),
        ),  # fmt: skip
        "glm4_moe": (
            "Glm4MoeConfig",
            dict(
                shape,
                head_dim=12,
                n_routed_experts=4,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
                **moe,
            ),
        ),  # fmt: skip
        # Chunked layers (keys only from the query's chunk of WINDOW tokens) and a NoPE layer.
        "llama4": (
            "Llama4TextConfig",
            dict(
                shape,
                head_dim=12,
                intermediate_size=32,
                intermediate_size_mlp=96,
                num_local_experts=4,
                num_experts_per_tok=1,
                attention_chunk_size=WINDOW,
                layer_types=["chunked_attention", "full_attention"],
                no_rope_layers=[1, 0],
                tie_word_embeddings=False,
            ),
        ),  # fmt: skip
        "gemma3": (
            "Gemma3TextConfig",
            dict(
                shape,
                head_dim=12,
                sliding_window=WINDOW,
                query_pre_attn_scalar=12,
                layer_types=["sliding_attention", "full_attention"],
                initializer_range=0.1,
            ),
        ),  # fmt: skip
        # Hybrids: gated delta-net / Mamba2 layers carry state across documents.
        "qwen3_next": (
            "Qwen3NextConfig",
            dict(
                shape,
                head_dim=16,
                shared_expert_intermediate_size=32,
                layer_types=["linear_attention", "full_attention"],
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                linear_key_head_dim=8,
                linear_value_head_dim=8,
                **moe,
            ),
        ),  # fmt: skip
        "nemotron_h": (
            "NemotronHConfig",
            dict(
                shape,
                head_dim=12,
                layers_block_type=["mamba", "attention", "moe"],
                mamba_num_heads=4,
                mamba_head_dim=12,
                ssm_state_size=8,
                n_groups=1,
                chunk_size=16,
                n_routed_experts=4,
                moe_shared_expert_intermediate_size=32,
                **moe,
            ),
        ),  # fmt: skip
    }
    return {
        name: getattr(transformers, cls)(**kwargs)
        for name, (cls, kwargs) in wanted.items()
        if hasattr(transformers, cls)
    }
