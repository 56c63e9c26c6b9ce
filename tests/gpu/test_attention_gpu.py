"""Packed attention on CUDA: varlen and flex kernels, windows and softcaps, in bf16."""

from __future__ import annotations

import pytest
import torch

from sftkit.model.attention import enable_packed_attention
from tests.unit.model.test_model_attention import (
    LENGTHS,
    doc_slices,
    documents,
    packed_batch,
    packed_family_error,
    tiny_llama,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_cuda_backends_match_per_document_reference(backend: str) -> None:
    model = tiny_llama(dtype=torch.bfloat16).cuda()
    enable_packed_attention(model, backend)
    batch = packed_batch().to("cuda")
    logits = model(**batch.model_kwargs(), use_cache=False).logits.float()
    logits.square().mean().backward()  # the backward must run too
    with torch.no_grad():
        worst = 0.0
        for d, r, s in doc_slices():
            ids = torch.tensor([documents(LENGTHS)[d][0]], device="cuda")
            ref = model(input_ids=ids, use_cache=False).logits[0].float()
            worst = max(worst, (logits[r, s : s + LENGTHS[d]] - ref).abs().max().item())
    assert worst < 5e-2  # bf16


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_packed_window_and_softcap_match_per_document_reference(family: str) -> None:
    assert packed_family_error(family, "cuda", torch.bfloat16) < 5e-2
