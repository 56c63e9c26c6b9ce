"""sftkit's packed attention: sinks, chunks and MLA value heads per backend; unknown keywords
refused with the model type."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sftkit.model.attention import _packed_forward, sftkit_packed_attention
from sftkit.model.attention_features import chunk_bounds, read_features

BOUNDS = [0, 5, 16, 24, 31, 32]  # 2 rows of 16: documents of 5 + 11, 8 + 7 + 1 tokens


def reference(q, k, v, bounds, sinks=None, chunk=None):  # type: ignore[no-untyped-def]
    """Eager maths, one document at a time: scores, causal (and chunk) mask, sink column."""
    heads = q.shape[1]
    qf, kf, vf = (x.transpose(0, 1).reshape(heads, -1, x.shape[-1]) for x in (q, k, v))
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        scores = qf[:, s:e] @ kf[:, s:e].transpose(-1, -2) * q.shape[-1] ** -0.5
        i = torch.arange(e - s)
        mask = i[:, None] >= i[None, :]
        if chunk:
            mask &= (i[:, None] // chunk) == (i[None, :] // chunk)
        scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks.view(-1, 1, 1).expand(-1, e - s, 1)], dim=-1)
        probs = scores.softmax(-1)[..., : e - s]
        outs.append(probs @ vf[:, s:e])
    return torch.cat(outs, 1).view(heads, q.shape[0], q.shape[2], -1).permute(1, 2, 0, 3)


@pytest.mark.parametrize("backend", ["segments", "sdpa", "flex"])
@pytest.mark.parametrize("feature", ["sinks", "mla", "chunk"])
def test_features_match_eager_maths_per_document(backend: str, feature: str) -> None:
    torch.manual_seed(0)
    value_dim = 6 if feature == "mla" else 8  # MLA: value heads narrower than query heads
    q, k = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    v = torch.randn(2, 2, 16, value_dim)
    sinks = torch.tensor([1.5, -0.5]) if feature == "sinks" else None
    chunk = 4 if feature == "chunk" else None
    cu = torch.tensor(BOUNDS, dtype=torch.int32)
    bounds = chunk_bounds(cu, chunk) if chunk else cu
    got = _packed_forward(backend, q, k, v, bounds, 16, 0.0, None, sinks=sinks)
    want = reference(q, k, v, BOUNDS, sinks, chunk)
    assert got.shape == (2, 16, 2, value_dim)
    assert float((got - want).abs().max()) < 1e-5
    dropped = reference(q, k, v, BOUNDS)  # the feature matters on these inputs
    if feature != "mla":
        assert float((got - dropped).abs().max()) > 1e-2


def test_chunk_bounds_split_documents_from_their_start() -> None:
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    assert chunk_bounds(cu, 4).tolist() == [0, 4, 5, 9, 13, 16, 20, 24]
    assert chunk_bounds(cu, 4) is chunk_bounds(cu, 4)  # one object per forward: caches hit


def _attention(model_type: str, **attrs: object) -> nn.Module:
    module = nn.Module()
    module.config = SimpleNamespace(model_type=model_type, **attrs)  # type: ignore[assignment]
    return module


def test_unknown_keyword_is_refused_naming_the_model_type() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="model_type 'newfam'.*'attn_bias_mode'"):
        sftkit_packed_attention(_attention("newfam"), q, q, q, None, attn_bias_mode="alibi")
    with pytest.raises(ValueError, match="bidirectional"):
        sftkit_packed_attention(_attention("enc"), q, q, q, None, is_causal=False)
    harmless = {"position_ids": None, "use_cache": False, "output_router_logits": True}
    assert read_features(_attention("ok"), harmless).plain


def test_layer_types_give_windows_and_chunks() -> None:
    config = dict(layer_types=["sliding_attention", "chunked_attention", "mamba"],
                  sliding_window=6, attention_chunk_size=4)  # fmt: skip
    layers = []
    for idx in range(3):
        module = _attention("hybrid", **config)
        module.layer_idx = idx  # type: ignore[assignment]
        layers.append(module)
    assert read_features(layers[0], {}).window == 6  # from config.layer_types alone
    assert read_features(layers[1], {}).chunk == 4
    with pytest.raises(ValueError, match="layer type 'mamba'"):
        read_features(layers[2], {})
