"""Fused RMSNorm / SwiGLU / RoPE equal HF's PyTorch code (values and grads), on CPU.

Triton's interpreter (TRITON_INTERPRET=1) must be set before triton is imported, so the
kernel comparisons run in one fresh subprocess with that environment (small shapes).
"""

from __future__ import annotations

import importlib.util
import textwrap
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.model.fused import apply_fused_kernels, compile_layers, resolve_fused_backend

SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama as ML
    from sftkit.model.kernels.fused_rmsnorm import rms_norm
    from sftkit.model.kernels.fused_rope import apply_rope
    from sftkit.model.kernels.fused_swiglu import silu_mul, silu_mul_linear
    from sftkit.model.fused import apply_fused_kernels, restore_rope

    def close(got, ref, tol):
        # Scaled: a bf16 reference is itself off by an ulp of its largest entries (gradient
        # sums over rows); a wrong formula is off by O(1) of them.
        scale = max(1.0, float(ref.float().abs().max()))
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale)

    def grads(fn, inputs, seed=3):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(seed)
        loss = sum((o.float() * torch.randn(o.shape)).sum() for o in outs)
        loss.backward()
        return [o.detach() for o in outs] + [t.grad for t in inputs]

    torch.manual_seed(0)
    # RMSNorm: 3-D input, width not a power of two, both dtypes and a float32 weight on
    # bfloat16 input (autocast over float32 master weights).
    for x_dtype, w_dtype, tol in [(torch.float32, torch.float32, 1e-5),
                                  (torch.bfloat16, torch.bfloat16, 2e-2),
                                  (torch.float32, torch.bfloat16, 2e-2)]:
        norm = ML.LlamaRMSNorm(48, eps=1e-5)
        w = (1 + 0.1 * torch.randn(48)).to(w_dtype)
        x = torch.randn(2, 37, 48).to(x_dtype)
        ref = grads(lambda x, w: ML.LlamaRMSNorm.forward(
            type("N", (), {"weight": w, "variance_epsilon": 1e-5})(), x), [x, w])
        got = grads(lambda x, w: rms_norm(x, w, 1e-5), [x, w])
        for g, r in zip(got, ref, strict=True):
            assert g.dtype == r.dtype and g.shape == r.shape, (g.dtype, r.dtype)
            close(g, r, tol)

    # SwiGLU: silu(gate) * up, numel not a multiple of the block.
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        a, b = torch.randn(3, 17, 40).to(dtype), torch.randn(3, 17, 40).to(dtype)
        ref = grads(lambda a, b: torch.nn.functional.silu(a) * b, [a, b])
        got = grads(silu_mul, [a, b])
        for g, r in zip(got, ref, strict=True):
            close(g, r, tol)

    # SwiGLU + down projection (product recomputed in backward), with a bias, and with a
    # float32 weight on bfloat16 activations (float32 master weights).
    F = torch.nn.functional
    for dtype, w_dtype, tol in [(torch.float32, torch.float32, 1e-5),
                                (torch.bfloat16, torch.float32, 3e-2)]:
        a, b = torch.randn(2, 9, 40).to(dtype), torch.randn(2, 9, 40).to(dtype)
        w, bias = (0.2 * torch.randn(24, 40)).to(w_dtype), torch.randn(24).to(w_dtype)
        ref = grads(lambda a, b, w, bias: F.linear(F.silu(a) * b, w.to(a.dtype),
                                                   bias.to(a.dtype)), [a, b, w, bias])
        got = grads(silu_mul_linear, [a, b, w, bias])
        for g, r in zip(got, ref, strict=True):
            assert g.dtype == r.dtype, (g.dtype, r.dtype)
            close(g, r, tol)

    # RoPE: GQA (6 q heads, 2 kv heads), q/k as HF's transposed views, per-row positions.
    cfg = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=64)
    rotary = ML.LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4]])
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        q = torch.randn(2, 11, 6, 16).to(dtype).transpose(1, 2)
        k = torch.randn(2, 11, 2, 16).to(dtype).transpose(1, 2)
        cos, sin = rotary(q, pos)
        for c, s in [(cos, sin), (cos[:1], sin[:1])]:
            ref = grads(lambda q, k: ML.apply_rotary_pos_emb(q, k, c, s), [q, k])
            got = grads(lambda q, k: apply_rope(q, k, c, s), [q, k])
            for g, r in zip(got, ref, strict=True):
                close(g, r, tol)

    # Whole tiny Llama: logits and every parameter gradient equal after patching.
    def run(model, ids):
        model.zero_grad()
        logits = model(input_ids=ids).logits
        torch.manual_seed(5)
        (logits * torch.randn(logits.shape)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (2, 13))
    ref_logits, ref_grads = run(model, ids)
    names = [n for n, _ in model.named_parameters()]
    calls = {"rope": 0}
    # With the `kernels` package installed, transformers >= 5.25 wraps the function in a
    # `Func` module without `__name__`: compare identity, not names.
    hf_rope = ML.apply_rotary_pos_emb
    applied = apply_fused_kernels(model, backend="triton")
    assert applied == ["rms_norm", "swiglu", "rope"], applied
    assert [n for n, _ in model.named_parameters()] == names
    assert type(model.model.norm).__name__ == "FusedLlamaRMSNorm"
    patched = ML.apply_rotary_pos_emb
    def counting(*a, **kw):
        calls["rope"] += 1
        return patched(*a, **kw)
    ML.apply_rotary_pos_emb = counting
    logits, got_grads = run(model, ids)
    assert calls["rope"] == 2, calls
    close(logits, ref_logits, 1e-4)
    for n in names:
        close(got_grads[n], ref_grads[n], 1e-4)
    restore_rope()
    assert ML.apply_rotary_pos_emb is hf_rope
    print("OK")
    """
)


@pytest.mark.slow
def test_triton_kernels_equal_hf_code(run_triton_interpreted: Any) -> None:
    run_triton_interpreted(SCRIPT)


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_leaves_model_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _tiny_llama()
    classes = [type(m) for m in model.modules()]
    assert resolve_fused_backend("auto", torch.device("cpu")) is None
    if importlib.util.find_spec("liger_kernel") is None:  # the planned CUDA choice
        assert resolve_fused_backend("auto", torch.device("cuda")) == "triton"
    assert apply_fused_kernels(model, device="cpu") == []
    assert apply_fused_kernels(model) == []
    assert [type(m) for m in model.modules()] == classes


def test_unknown_op_and_backend_are_rejected() -> None:
    with pytest.raises(ValueError, match="rms_norm, swiglu, rope"):
        apply_fused_kernels(_tiny_llama(), enabled={"rmsnorm"})
    with pytest.raises(ValueError, match="auto, liger or triton"):
        resolve_fused_backend("cuda", torch.device("cpu"))  # type: ignore[arg-type]


def test_compile_layers_keeps_parameter_names() -> None:
    model = _tiny_llama()
    keys = list(model.state_dict())
    assert compile_layers(model) == 2
    assert list(model.state_dict()) == keys
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
