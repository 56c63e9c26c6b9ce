"""Chunked linear + cross-entropy equals the plain loss (sftkit.train.loss)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import sftkit.train.loss as loss_mod
from sftkit.batch import collate_packed, collate_padded
from sftkit.data.packing import pack_sequences
from sftkit.model.attention import enable_packed_attention
from sftkit.train.loss import chunked_nll_sum, model_hidden_and_head


def _inputs(n: int, h: int = 16, v: int = 53, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, b, labels


def _grads(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    present = [t for t in tensors if t is not None]
    return list(torch.autograd.grad(loss, present))


@pytest.mark.parametrize("chunk_size", [1, 7, 37, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradients_equal_plain_cross_entropy(chunk_size: int, bias: bool) -> None:
    hidden, weight, b, labels = _inputs(37, bias=bias)  # 37 is not a multiple of 7
    plain = F.cross_entropy(F.linear(hidden, weight, b), labels, reduction="sum")
    chunked = chunked_nll_sum(hidden, weight, labels, chunk_size=chunk_size, lm_head_bias=b)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked.double(), plain, rtol=1e-6, atol=1e-5)
    # A non-unit upstream gradient (the loop divides by the global token count).
    for got, want in zip(
        _grads(chunked / 13.0, hidden, weight, b),
        _grads(plain / 13.0, hidden, weight, b),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_float32_and_frozen_head() -> None:
    hidden, weight, _, labels = _inputs(29)
    hidden = hidden.detach().float().requires_grad_()
    weight = weight.detach().float()  # frozen head (LoRA): no weight gradient is computed
    plain = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    chunked = chunked_nll_sum(hidden, weight, labels, chunk_size=8)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(_grads(chunked, hidden)[0], _grads(plain, hidden)[0])


def test_bfloat16_matches_float32_reference() -> None:
    hidden, weight, _, labels = _inputs(64, h=32, v=97)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    h32 = h16.detach().double().requires_grad_()
    w32 = w16.detach().double().requires_grad_()
    chunked = chunked_nll_sum(h16, w16, labels, chunk_size=10)
    plain = F.cross_entropy(h32 @ w32.T, labels, reduction="sum")
    torch.testing.assert_close(chunked.double(), plain, rtol=1e-2, atol=1e-2)
    got = _grads(chunked / 7.0, h16, w16)
    want = _grads(plain / 7.0, h32, w32)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


def test_all_ignored_and_no_grad() -> None:
    hidden, weight, _, labels = _inputs(10)
    labels[:] = -100
    out = chunked_nll_sum(hidden, weight, labels, chunk_size=3)
    assert out.item() == 0.0
    assert all(g.abs().max() == 0 for g in _grads(out, hidden, weight))
    hidden, weight, _, labels = _inputs(10)
    with torch.no_grad():
        value = chunked_nll_sum(hidden, weight, labels, chunk_size=3)
    plain = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    torch.testing.assert_close(value.double(), plain.detach(), rtol=1e-6, atol=1e-5)


def test_never_materialises_more_than_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    rows_seen: list[int] = []
    original = loss_mod._chunk_logits

    def spy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        rows_seen.append(h.shape[0])
        return original(h, w, b)

    monkeypatch.setattr(loss_mod, "_chunk_logits", spy)
    hidden, weight, _, labels = _inputs(50)
    chunked_nll_sum(hidden, weight, labels, chunk_size=16).backward()
    assert rows_seen == [16, 16, 16, 2]  # the backward reuses the forward's chunk gradients


def test_rejects_bad_arguments() -> None:
    hidden, weight, _, labels = _inputs(5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_nll_sum(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="5 rows but labels has 4"):
        chunked_nll_sum(hidden, weight, labels[:4])


def _tiny(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for n in [6, 11, 3, 9, 14, 5]:
        prompt = rng.randint(1, n - 1)
        out.append(([rng.randrange(1, 67) for _ in range(n)], [0] * prompt + [1] * (n - prompt)))
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_equals_hf_logits_loss(tie: bool) -> None:
    model = _tiny(tie)
    enable_packed_attention(model)
    batch = collate_padded(_examples(), pad_id=0, multiple_of=8)
    logits = model(**batch.model_kwargs(), use_cache=False).logits
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch.labels[:, 1:].reshape(-1),
        reduction="sum",
    )
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden, weight, targets = model_hidden_and_head(model, batch)
    assert hidden.shape[0] == targets.shape[0] == batch.num_target_tokens  # only trained rows
    chunked = chunked_nll_sum(hidden, weight, targets, chunk_size=5)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_loss_and_gradients_equal_padded() -> None:
    examples = _examples(1)
    model = _tiny()
    enable_packed_attention(model)
    padded = collate_padded(examples, pad_id=0, multiple_of=1)
    chunked_nll_sum(*model_hidden_and_head(model, padded)).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    bins = pack_sequences([len(ids) for ids, _ in examples], 20, "first_fit_decreasing")
    packed = collate_packed(examples, bins, row_tokens=24, pad_id=0)
    assert packed.num_target_tokens == padded.num_target_tokens
    packed_loss = chunked_nll_sum(*model_hidden_and_head(model, packed))
    packed_loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_hidden_and_head_guards() -> None:
    model = _tiny()
    examples = _examples()
    bins = pack_sequences([len(ids) for ids, _ in examples], 24, "concatenative")
    packed = collate_packed(examples, bins, 24, 0)
    with pytest.raises(ValueError, match="call sftkit.model.attention.enable_packed_attention"):
        model_hidden_and_head(model, packed)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        model_hidden_and_head(model, packed)
