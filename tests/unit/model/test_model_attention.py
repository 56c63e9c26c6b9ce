"""Packed rows attend within their documents only (sftkit.model.attention)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sftkit.batch import PackedBatch, collate_packed, collate_padded
from sftkit.model.attention import ATTN_NAME, _flex_api, enable_packed_attention

VOCAB = 101


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def documents(lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, VOCAB) for _ in range(n)], [1] * n) for n in lengths]


# Several documents per row, pad tails on rows 0 and 2, a full row, a lone document.
LENGTHS = [5, 9, 3, 7, 11, 2, 16]
BINS = [[0, 1, 2], [3, 4, 5], [6]]
ROW = 20


def packed_batch() -> PackedBatch:
    return collate_packed(documents(LENGTHS), BINS, ROW, pad_id=0)


def doc_slices() -> list[tuple[int, int, int]]:
    """(document, row, start) of every packed document."""
    out = []
    for r, bin_ in enumerate(BINS):
        start = 0
        for d in bin_:
            out.append((d, r, start))
            start += LENGTHS[d]
    return out


def max_doc_error(model: LlamaForCausalLM, logits: torch.Tensor) -> float:
    """Largest |packed - unpacked| logit over all documents."""
    worst = 0.0
    for d, r, s in doc_slices():
        ids = torch.tensor([documents(LENGTHS)[d][0]])
        ref = model(input_ids=ids, use_cache=False).logits[0]
        worst = max(worst, (logits[r, s : s + LENGTHS[d]] - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("backend", ["segments", "sdpa"])
def test_packed_logits_and_gradients_equal_unpacked(backend: str) -> None:
    model = tiny_llama()
    assert enable_packed_attention(model, backend) == backend
    assert model.config._attn_implementation == ATTN_NAME
    batch = packed_batch()
    weights = torch.randn(len(BINS), ROW, VOCAB, generator=torch.Generator().manual_seed(1))

    logits = model(**batch.model_kwargs(), use_cache=False).logits
    pad = torch.zeros(len(BINS), ROW, 1)
    for d, r, s in doc_slices():
        pad[r, s : s + LENGTHS[d]] = 1.0  # only document tokens enter the objective
    (logits * weights * pad).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    with torch.no_grad():
        assert max_doc_error(model, logits) < 1e-5
    for d, r, s in doc_slices():
        ids = torch.tensor([documents(LENGTHS)[d][0]])
        ref = model(input_ids=ids, use_cache=False).logits[0]
        (ref * weights[r, s : s + LENGTHS[d]]).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(_flex_api() is None, reason="this torch has no flex_attention")
def test_flex_path_logits_equal_unpacked() -> None:
    # Flex attention has no CPU backward (torch 2.15): forward only here; the GPU bench and
    # the CUDA test below cover its gradients through varlen/flex.
    model = tiny_llama()
    assert enable_packed_attention(model, "flex") == "flex"
    with torch.no_grad():
        logits = model(**packed_batch().model_kwargs(), use_cache=False).logits
        assert max_doc_error(model, logits) < 1e-5


def test_without_boundaries_documents_leak() -> None:
    # The check above can fail: dropping the boundaries (plain causal attention over the
    # row) or HF sdpa with a 2D mask lets the later documents see the earlier ones.
    model = tiny_llama()
    enable_packed_attention(model)
    batch = packed_batch()
    no_cu = {k: v for k, v in batch.model_kwargs().items() if not k.startswith(("cu_", "max_"))}
    with torch.no_grad():
        assert max_doc_error(model, model(**no_cu, use_cache=False).logits) > 1e-3
        model.set_attn_implementation("sdpa")
        ones = torch.ones_like(batch.input_ids)
        leaked = model(**batch.model_kwargs(), attention_mask=ones, use_cache=False).logits
        assert max_doc_error(model, leaked) > 1e-3


def test_padded_batch_is_plain_causal_attention() -> None:
    model = tiny_llama()
    enable_packed_attention(model)
    examples = documents([4, 12, 7])
    batch = collate_padded(examples, pad_id=0, multiple_of=8)
    with torch.no_grad():
        logits = model(**batch.model_kwargs(), use_cache=False).logits
        for r, (ids, _) in enumerate(examples):
            ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[r, : len(ids)], ref, atol=1e-5, rtol=1e-5)


def test_backend_choice_and_errors() -> None:
    model = tiny_llama()
    assert enable_packed_attention(model) == "segments"  # auto on CPU
    with pytest.raises(ValueError, match="varlen attention needs"):
        enable_packed_attention(model, "varlen")
    batch = packed_batch()
    with pytest.raises(ValueError, match="do not pass an attention_mask"):
        model(**batch.model_kwargs(), attention_mask=torch.ones(3, ROW, ROW)[:, None].bool())


def windowed_or_capped(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny Mistral (sliding window 6) or Gemma2 (window 6, attention and final softcaps)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 head_dim=16, sliding_window=6, attention_dropout=0.0)  # fmt: skip
    if family == "mistral":
        model: torch.nn.Module = MistralForCausalLM(MistralConfig(**shape))
    else:
        config = Gemma2Config(**shape, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                              query_pre_attn_scalar=16, attn_implementation="eager")  # fmt: skip
        model = Gemma2ForCausalLM(config)
    return model.to(dtype)


def packed_family_error(family: str, device: str, dtype: torch.dtype) -> float:
    """Largest |packed - alone| logit over the packed documents, the reference being the
    model's own (eager) attention on each document alone; the backward runs too."""
    import copy

    model = windowed_or_capped(family, dtype).to(device)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    enable_packed_attention(model)  # auto: varlen (window) / flex (softcap) on CUDA
    logits = model(**packed_batch().to(device).model_kwargs(), use_cache=False).logits.float()
    logits.square().mean().backward()
    worst = 0.0
    with torch.no_grad():
        for d, r, s in doc_slices():
            ids = torch.tensor([documents(LENGTHS)[d][0]], device=device)
            ref = reference(input_ids=ids, use_cache=False).logits[0].float()
            worst = max(worst, (logits[r, s : s + LENGTHS[d]] - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_packed_window_and_softcap_match_per_document_reference(family: str) -> None:
    assert packed_family_error(family, "cpu", torch.float32) < 1e-5  # CUDA: tests/gpu
