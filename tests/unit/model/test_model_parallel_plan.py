"""The tensor-parallel plan taken from a model's own config."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.model.parallel import tensor_parallel_plan


def test_model_plan_keeps_the_head_and_tied_embedding_whole() -> None:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    # transformers 5.17 adds this entry for tied embeddings; the chunked loss needs the
    # head (that same weight) whole on every tensor-parallel rank.
    config.base_model_tp_plan = {**config.base_model_tp_plan, "embed_tokens": "embedding_rowwise"}
    plan = tensor_parallel_plan(LlamaForCausalLM(config), None, sequence_parallel=False)
    assert "model.embed_tokens" not in plan and not any("lm_head" in k for k in plan)
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"
