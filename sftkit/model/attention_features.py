"""What one attention call asks of sftkit's packed attention, or a one-line refusal.

transformers hands an attention function its per-layer options as keyword arguments, and
some options only as masks that sftkit never builds (its implementation is not a mask
interface). Anything that reaches `sftkit_packed_attention` is therefore either read here
or refused: an ignored keyword trains another function without a word (gpt-oss's sinks
`s_aux` were dropped under packing: its tiny model's logits moved by 0.25).

Implemented: sliding windows (the `sliding_window` keyword, or a `sliding_attention` entry
of `config.layer_types`), attention-logit softcapping (`softcap`), attention sinks (`s_aux`,
gpt-oss: one extra logit per head in the softmax), chunked attention (Llama 4's
`chunked_attention` layers: keys only from the query's own `attention_chunk_size` chunk of
its document), and value heads of another size than query/key heads (MLA, DeepSeek-V3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Keywords that do not change the attention maths: the packed boundaries (read by sftkit),
# cache and output switches, and sftkit's own context-parallel layout.
HARMLESS_KWARGS = frozenset({
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids",
    "cache_position", "use_cache", "output_attentions", "output_hidden_states",
    "output_router_logits", "return_dict", "sftkit_cp",
})  # fmt: skip
IMPLEMENTED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux"})
# `config.layer_types` entries of layers that reach an attention function (Falcon-H1's
# "hybrid" layers run full causal attention beside a Mamba mixer).
_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "hybrid"})


@dataclass(frozen=True)
class LayerFeatures:
    """Per-document options of one attention call (None: not used by this layer)."""

    window: int | None = None  # keys visible per query, itself included
    softcap: float | None = None  # tanh(s / c) * c on the scores
    sinks: Tensor | None = None  # [heads] extra logit per head, dropped after the softmax
    chunk: int | None = None  # keys only from the query's chunk of this size

    @property
    def plain(self) -> bool:
        return (
            self.window is None
            and self.softcap is None
            and self.sinks is None
            and (self.chunk is None)
        )


def model_type(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return str(getattr(config, "model_type", None) or type(module).__name__)


def _refuse(module: nn.Module, what: str) -> ValueError:
    return ValueError(
        f"model_type {model_type(module)!r}: {what}, which sftkit's packed attention does not "
        "implement; disable policy.sequence_packing (and context parallelism) for this model"
    )


def read_features(module: nn.Module, kwargs: dict[str, Any]) -> LayerFeatures:
    """The features this call needs; ValueError naming the model type for anything else."""
    unknown = sorted(set(kwargs) - HARMLESS_KWARGS - IMPLEMENTED_KWARGS - {"is_causal"})
    if unknown:
        raise _refuse(module, f"its attention layers pass {unknown}")
    if kwargs.get("is_causal", True) is False or getattr(module, "is_causal", True) is False:
        raise _refuse(module, "its attention is bidirectional (is_causal=False)")
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    layer_type = None
    if layer_types is not None and isinstance(layer_idx, int) and layer_idx < len(layer_types):
        layer_type = layer_types[layer_idx]
        if layer_type not in _LAYER_TYPES:
            raise _refuse(module, f"layer {layer_idx} has layer type {layer_type!r}")
    window = kwargs.get("sliding_window")
    if window is None and layer_type == "sliding_attention":
        # HF builds this layer's mask from config.sliding_window (not every model passes it)
        window = getattr(config, "sliding_window", None)
    chunk = None
    if layer_type == "chunked_attention":
        chunk = getattr(config, "attention_chunk_size", None)
        if not chunk:
            raise _refuse(module, f"layer {layer_idx} is chunked without attention_chunk_size")
    sinks = kwargs.get("s_aux")
    return LayerFeatures(
        window=int(window) if window is not None and window > 0 else None,
        softcap=kwargs.get("softcap"),
        sinks=sinks if isinstance(sinks, Tensor) else None,
        chunk=int(chunk) if chunk else None,
    )


# One refined boundary tensor per (boundaries object, chunk): every layer gets the same
# object back, so the per-forward mask caches keyed on identity keep hitting.
_chunked: dict[int, tuple[Tensor, Tensor]] = {}


def chunk_bounds(cu_seqlens: Tensor, chunk: int) -> Tensor:
    """`cu_seqlens` with a boundary every `chunk` tokens from each document's start.

    Chunked causal attention within a document is causal attention within each chunk, so
    every backend (varlen, flex, SDPA, per segment) runs it unchanged on these boundaries."""
    hit = _chunked.get(chunk)
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1]
    bounds = cu_seqlens.tolist()
    out = [bounds[0]]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        out.extend(range(start + chunk, end, chunk))
        out.append(end)
    refined = torch.tensor(out, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    _chunked[chunk] = (cu_seqlens, refined)
    return refined


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Attention output with one extra per-head logit `sinks` in the softmax, from the output
    and log-sum-exp without it: each weight shrinks by exp(lse) / (exp(lse) + exp(sink)).

    `out` is [rows, H, T, D] and `lse` [rows, H, T] (flex attention's layout)."""
    keep = torch.sigmoid(lse.float() - sinks.float()[None, :, None])
    return (out.float() * keep[..., None]).to(out.dtype)
