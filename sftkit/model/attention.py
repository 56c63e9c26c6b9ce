"""Document-isolating attention for packed rows, as a transformers attention function.

Packed rows hold several documents back to back. In transformers 5 (5.17, 5.24), restarting
`position_ids` per document isolates documents on sdpa/eager/flex only when neither an
`attention_mask` nor a cache is passed (`use_cache` defaults to True in most configs), and
then through a dense [T, T] mask; measured on 5.24 with a 2D all-ones mask or the default
`use_cache`, the second document's logits move by 0.28 (the issue measured 0.5). So the
boundaries travel explicitly: `PackedBatch.model_kwargs()` adds transformers' flash-varlen
kwargs (`cu_seq_lens_q/k`, `max_length_q/k`), the decoder forwards them through `**kwargs`
to every attention call, and the function registered here as `sftkit_packed` uses them.

Why it reaches us: `create_causal_mask` returns early with no mask for an implementation
that is not in `ALL_MASK_ATTENTION_FUNCTIONS` (we register none), so no O(T^2) mask is built
and `attention_mask` is None; the kwargs arrive untouched (LlamaModel -> decoder layer ->
attention -> interface in 5.17 and 5.24).

Sliding windows (Mistral, Qwen2, Gemma2 local layers) and attention-logit softcapping
(Gemma2) arrive as the `sliding_window` / `softcap` kwargs and are applied inside each
document by every backend: a band mask (window) and `tanh(s / c) * c` on the scores
(softcap; flex `score_mod`, or explicit score maths on the other backends since SDPA and
varlen have no softcap). Padded rows of such models take the same path, one segment a row.

Backends, fastest first (H200, 4 x 4096 tokens, fwd+bwd, `docs/perf.md` section 3):
varlen_attn 1.86 ms, compiled flex 2.07 ms, SDPA + boolean block mask 7.70 ms. On CPU,
`segments` (one causal SDPA per document) is the default: flex has no CPU backward and the
block mask costs rows x T^2.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftkit.model.attention_features import (
    LayerFeatures,
    apply_sinks,
    chunk_bounds,
    model_type,
    read_features,
)
from sftkit.model.flex import flex as _flex
from sftkit.model.flex import flex_api as _flex_api

ATTN_NAME = "sftkit_packed"
Backend = Literal["auto", "varlen", "flex", "sdpa", "segments"]
_BACKEND_ATTR = "_sftkit_packed_backend"


@functools.cache
def _varlen() -> Callable[..., Any] | None:
    """torch's flash varlen attention (torch >= 2.10), imported lazily: importing it pulls in
    torch._dynamo, about 7 s on a 2-core CPU."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


@functools.cache
def _varlen_params() -> frozenset[str]:
    varlen = _varlen()
    return frozenset(inspect.signature(varlen).parameters if varlen else ())


def _varlen_kwargs(scaling: float | None, head_dim: int, window: int | None) -> dict[str, Any]:
    """varlen_attn's keywords differ across torch releases: causal is `window_size=(-1, 0)`
    on newer torch and `is_causal` before; `enable_gqa` and `scale` are newer still.
    A sliding window of W keys (the query's own included) is `window_size=(W - 1, 0)`."""
    params = _varlen_params()
    left = -1 if window is None else window - 1
    kwargs: dict[str, Any] = {"window_size": (left, 0)} if "window_size" in params else {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    if "enable_gqa" in params:  # torch 2.11 handles GQA without the flag (docs/perf.md)
        kwargs["enable_gqa"] = True
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim**-0.5) > 1e-6 * scaling:
        raise ValueError(
            f"this torch's varlen_attn has no `scale` (the model uses {scaling}); use backend "
            "'flex' or upgrade torch"
        )
    return kwargs


def resolve_backend(requested: Backend, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `requested` turns into for tensors on `device` of `dtype`."""
    cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if cuda and half and _varlen() is not None:
            return "varlen"
        if cuda:
            return "flex" if _flex_api() is not None else "sdpa"
        # CPU: uncompiled flex materialises every score and has no backward, and a block
        # mask costs rows x T^2; one causal SDPA per document costs sum(L^2) (16x less for
        # 16 documents per row), and a host-side loop over segments is free on CPU.
        return "segments"
    if requested == "varlen" and not (cuda and half and _varlen() is not None):
        raise ValueError(
            "varlen attention needs torch.nn.attention.varlen (torch >= 2.10), CUDA and "
            f"bf16/fp16 tensors (got {device.type}, {dtype}); use backend 'auto', 'flex' or 'sdpa'"
        )
    if requested == "flex" and _flex_api() is None:
        raise ValueError("this torch has no flex_attention; use backend 'sdpa'")
    return requested


def _backend_for_layer(
    backend: str,
    requested: Backend,
    window: int | None,
    softcap: float | None,
    dropout: float,
    sinks: bool = False,
    value_dim_differs: bool = False,
) -> str:
    """`backend` adjusted to what one layer needs: varlen has no softcap, sinks or MLA value
    heads (and older torch no window), varlen and flex have no dropout. `auto` moves on; an
    explicit choice fails."""
    needs: list[str] = []
    if backend == "varlen" and softcap is not None:
        needs.append("attention-logit softcapping")
    if backend == "varlen" and sinks:
        needs.append("attention sinks")
    if backend == "varlen" and value_dim_differs:
        needs.append("value heads of another size than key heads (MLA)")
    if backend == "varlen" and window is not None and "window_size" not in _varlen_params():
        needs.append("a sliding window on this torch")
    if backend in ("varlen", "flex") and dropout > 0:
        needs.append("attention dropout")
    if not needs:
        return backend
    if requested == "auto":
        if dropout > 0:
            return "sdpa"
        return "flex" if _flex_api() is not None else "sdpa"
    raise ValueError(
        f"{backend} packed attention does not support {' or '.join(needs)}; use backend "
        "'auto' or 'sdpa' (or set the model's attention_dropout to 0)"
    )


# One cached mask per forward: every layer receives the same cu_seqlens tensor object, so
# the block mask is built once per micro-batch instead of once per layer (per window size:
# Gemma2 alternates sliding and global layers).
_mask_cache: dict[str, Any] = {}
# Padded rows of sliding-window / softcap models, as one segment per row; one tensor object
# per shape so the mask cache above hits across layers.
_row_bounds: dict[tuple[int, int, str], Tensor] = {}


def _rows_as_segments(rows: int, width: int, device: torch.device) -> Tensor:
    key = (rows, width, str(device))
    if key not in _row_bounds:
        if len(_row_bounds) > 64:
            _row_bounds.clear()
        _row_bounds[key] = torch.arange(0, rows * width + 1, width, dtype=torch.int32)
    return _row_bounds[key]


def _document_ids(cu_seqlens: Tensor, rows: int, width: int, device: torch.device) -> Tensor:
    """Segment index of each token, [rows, width]; segments never span rows."""
    tokens = torch.arange(rows * width, device=device, dtype=torch.int32)
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return torch.searchsorted(cu[1:].contiguous(), tokens, right=True).view(rows, width)


def _cached(kind: str, cu_seqlens: Tensor, shape: tuple[int, ...], build: Callable[[], Any]) -> Any:
    hit = _mask_cache.get(kind)
    if hit is not None and hit[0] is cu_seqlens and hit[1] == shape:
        return hit[2]
    value = build()
    _mask_cache[kind] = (cu_seqlens, shape, value)
    return value


def _causal(width: int, window: int | None, device: torch.device) -> Tensor:
    """[T, T] boolean: key j visible from query i (j <= i, and i - j < window if windowed),
    HF's `sliding_window_overlay` (`kv_idx > q_idx - sliding_window`)."""
    i = torch.arange(width, device=device)
    delta = i[:, None] - i[None, :]
    visible = delta >= 0
    return visible if window is None else visible & (delta < window)


def _sdpa_block_mask(
    cu_seqlens: Tensor, rows: int, width: int, device: torch.device, window: int | None
) -> Tensor:
    docs = _document_ids(cu_seqlens, rows, width, device)
    causal = _causal(width, window, device)
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]  # [rows, 1, T, T]


def _flex_block_mask(
    cu_seqlens: Tensor, rows: int, width: int, device: torch.device, window: int | None
) -> Any:
    docs = _document_ids(cu_seqlens, rows, width, device)
    span = window or 0

    def document_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (docs[b, q] == docs[b, kv]) & (q >= kv)

    def document_window(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (docs[b, q] == docs[b, kv]) & (q >= kv) & (q - kv < span)

    create_block_mask = _flex_api()[0]  # type: ignore[index]
    mask_mod = document_causal if window is None else document_window
    return create_block_mask(mask_mod, rows, None, width, width, device=device)


def _math_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor,
    dropout: float,
    scaling: float | None,
    softcap: float | None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention with explicit scores ([..., H, T, D] in, same out), for softcapping and
    sinks, which SDPA lacks. Follows HF's eager maths (Gemma2, gpt-oss): scale, tanh cap,
    mask, one sink logit per head appended, float32 softmax, the sink's weight dropped."""
    groups = query.shape[-3] // key.shape[-3]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


def _softcap_mod(softcap: float | None) -> Callable[..., Tensor] | None:
    if softcap is None:
        return None

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return score_mod


def _per_segment(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    dropout: float,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
    sinks: Tensor | None = None,
) -> Tensor:
    """One causal attention per segment; [rows, T, heads, value_dim] out."""
    rows, heads, width, _ = query.shape
    value_dim = value.shape[-1]  # MLA: value heads may be narrower than query/key heads

    def flat(x: Tensor) -> Tensor:  # [rows, h, T, D] -> [h, rows * T, D]
        return x.transpose(0, 1).reshape(x.shape[1], rows * width, x.shape[-1])

    q, k, v = flat(query), flat(key), flat(value)
    bounds = cu_seqlens.tolist()
    gqa = k.shape[0] != heads
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if softcap is not None or sinks is not None:
            mask = _causal(e - s, window, q.device)
            outs.append(_math_attention(q[:, s:e], k[:, s:e], v[:, s:e], mask, dropout,
                                        scaling, softcap, sinks))  # fmt: skip
        elif window is not None and e - s > window:
            mask = _causal(e - s, window, q.device)
            outs.append(F.scaled_dot_product_attention(
                q[:, s:e], k[:, s:e], v[:, s:e], attn_mask=mask, dropout_p=dropout,
                scale=scaling, enable_gqa=gqa,
            ))  # fmt: skip
        else:
            outs.append(F.scaled_dot_product_attention(
                q[:, s:e], k[:, s:e], v[:, s:e], dropout_p=dropout, is_causal=True,
                scale=scaling, enable_gqa=gqa,
            ))  # fmt: skip
    return torch.cat(outs, dim=1).view(heads, rows, width, value_dim).permute(1, 2, 0, 3)


def _packed_forward(
    backend: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout: float,
    scaling: float | None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention over packed rows, [rows, T, heads, value_dim] out; q/k/v are [rows, H, T, D].

    `window` (keys visible per query, itself included), `softcap` and `sinks` (one extra
    logit per head) apply per document."""
    rows, heads, width, head_dim = query.shape
    if backend in ("varlen", "flex") and dropout > 0:
        raise ValueError(
            f"{backend} packed attention has no dropout; set the model's attention_dropout "
            "to 0 or use backend 'sdpa'"
        )
    if backend == "varlen":
        if softcap is not None or sinks is not None or value.shape[-1] != head_dim:
            raise ValueError(
                "varlen packed attention has no softcapping, sinks or MLA value heads; use "
                "backend 'flex'"
            )
        cu = cu_seqlens.to(device=query.device, dtype=torch.int32)

        def flat(x: Tensor) -> Tensor:  # [rows, h, T, D] -> [rows * T, h, D]
            return x.transpose(1, 2).reshape(rows * width, x.shape[1], head_dim)

        out = _varlen()(  # type: ignore[misc]
            flat(query), flat(key), flat(value), cu, cu, max_seqlen, max_seqlen,
            **_varlen_kwargs(scaling, head_dim, window),
        )  # fmt: skip
        return out.view(rows, width, heads, head_dim)
    if backend == "flex":
        block_mask = _cached(
            f"flex:{window}", cu_seqlens, (rows, width),
            lambda: _flex_block_mask(cu_seqlens, rows, width, query.device, window),
        )  # fmt: skip
        gqa = key.shape[1] != heads
        if sinks is None:
            out = _flex(query, key, value, block_mask=block_mask, scale=scaling,
                        enable_gqa=gqa, score_mod=_softcap_mod(softcap))  # fmt: skip
        else:  # the sink logit joins the softmax through flex's log-sum-exp
            from torch.nn.attention.flex_attention import AuxRequest

            both: Any = _flex(query, key, value, block_mask=block_mask, scale=scaling,
                              enable_gqa=gqa, score_mod=_softcap_mod(softcap),
                              return_aux=AuxRequest(lse=True))  # fmt: skip
            out, aux = both
            out = apply_sinks(out, aux.lse, sinks)
        return out.transpose(1, 2)
    if backend == "segments":
        return _per_segment(query, key, value, cu_seqlens, dropout, scaling, window, softcap, sinks)
    mask = _cached(
        f"sdpa:{window}", cu_seqlens, (rows, width),
        lambda: _sdpa_block_mask(cu_seqlens, rows, width, query.device, window),
    )  # fmt: skip
    if softcap is not None or sinks is not None:
        out = _math_attention(query, key, value, mask, dropout, scaling, softcap, sinks)
        return out.transpose(1, 2)
    groups = heads // key.shape[1]
    if groups > 1:  # the math/efficient SDPA kernels take a mask only with equal head counts
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2)


def sftkit_packed_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: document-isolated for packed rows, else causal.

    Packed rows are recognised by `cu_seq_lens_q` in kwargs (see `PackedBatch.model_kwargs`).
    Sliding windows, softcapping, sinks and chunked layers (`attention_features`) apply
    within each document; padded rows of such models run as one segment per row. Any other
    keyword that is not known to be harmless is refused there, naming the model type.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    feats = read_features(module, kwargs)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    layout = kwargs.get("sftkit_cp")
    if layout is not None:  # a context-parallel shard (sftkit.model.context_parallel)
        return _context_parallel(module, query, key, value, layout, dropout, scaling, feats)
    if cu_seqlens is None and feats.plain:
        # Padded rows: plain causal SDPA. Padding is on the right, so pads only ever follow
        # real tokens and the loss mask drops them.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling
        )
    if attention_mask is not None:
        raise ValueError(
            "sftkit_packed attention takes document boundaries from cu_seqlens (packed rows) "
            "or one causal segment per right-padded row; do not pass an attention_mask"
        )
    rows, _, width, _ = query.shape
    if cu_seqlens is None:
        cu_seqlens = _rows_as_segments(rows, width, query.device)
    max_seqlen = int(kwargs.get("max_length_q") or width)
    if feats.chunk is not None:
        cu_seqlens = chunk_bounds(cu_seqlens, feats.chunk)
        max_seqlen = min(max_seqlen, feats.chunk)
    requested: Backend = getattr(module, _BACKEND_ATTR, "auto")
    device_type = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        # Under autocast HF's RoPE hands back float32 q/k; attention would run in the
        # autocast dtype anyway, so cast here and keep the fast varlen kernel on GPU.
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    backend = resolve_backend(requested, query.device, query.dtype)
    backend = _backend_for_layer(
        backend, requested, feats.window, feats.softcap, dropout,
        sinks=feats.sinks is not None, value_dim_differs=value.shape[-1] != query.shape[-1],
    )  # fmt: skip
    out = _packed_forward(
        backend, query, key, value, cu_seqlens, max_seqlen, dropout, scaling, feats.window,
        feats.softcap, feats.sinks,
    )  # fmt: skip
    return out, None


def _context_parallel(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: Any,
    dropout: float,
    scaling: float | None,
    feats: LayerFeatures,
) -> tuple[Tensor, None]:
    from sftkit.model.context_parallel import context_parallel_attention

    if dropout > 0 or not feats.plain or value.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"model_type {model_type(module)!r}: policy.dtensor_cfg.context_parallel_size > 1 "
            "supports plain causal attention only (no attention dropout, sliding window, "
            "softcapping, sinks, chunked layers or MLA value heads); set "
            "policy.hf_config_overrides.attention_dropout=0 or context_parallel_size=1"
        )
    device_type = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # as in sftkit_packed_attention
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    return context_parallel_attention(query, key, value, layout, scaling), None


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Switch an HF model's attention function (`set_attn_implementation` where transformers
    has it, else the config field the attention layers read)."""
    set_impl = getattr(model, "set_attn_implementation", None)
    if callable(set_impl):
        set_impl(name)
    else:
        model.config._attn_implementation = name  # type: ignore[union-attr]


def enable_packed_attention(
    model: nn.Module, backend: Backend = "auto", device: torch.device | None = None
) -> str:
    """Make an HF model honour document boundaries (`cu_seq_lens_q`) in packed rows.

    Registers `sftkit_packed` with transformers' `AttentionInterface` and switches the model
    to it. `auto` picks torch's `varlen_attn` on CUDA with bf16/fp16, compiled flex attention
    on other CUDA dtypes, and one causal SDPA per document (`segments`) on CPU; `sdpa` (one
    SDPA with a block-diagonal causal mask) is the portable fallback. Batches without
    `cu_seq_lens_q` run plain causal SDPA. Returns the backend chosen for the model's current
    device and dtype (re-resolved per call, so moving the model later is fine); `device`
    names where the model will run when it is not there yet (e.g. still on the meta device,
    where the document-isolation check is skipped: call `check_document_isolation` later).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, sftkit_packed_attention)
    param = next(model.parameters())
    chosen = resolve_backend(backend, device or param.device, param.dtype)
    set_attention_implementation(model, ATTN_NAME)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl != ATTN_NAME:
        raise ValueError(
            f"{type(model).__name__} did not switch to {ATTN_NAME} (still {impl!r}); it does not "
            "use transformers' AttentionInterface, so packed rows cannot be isolated; disable "
            "policy.sequence_packing for this model"
        )
    for sub in model.modules():  # the attention function reads the request from its module
        setattr(sub, _BACKEND_ATTR, backend)
    check_document_isolation(model)
    return chosen


@torch.no_grad()
def check_document_isolation(model: nn.Module) -> None:
    """Raise unless each document of a packed row gets the logits HF's eager attention (the
    model's own definition) gives it alone. Skipped on the meta device.

    Two failures, told apart. One document differs from eager: the model uses an attention
    feature sftkit lacks that no keyword showed (e.g. a mask-only option). A document moves
    when another precedes it: a layer outside the attention interface (Mamba, convolutions,
    linear attention: Falcon-H1, Nemotron-H, Qwen3-Next) carries state across the boundary;
    a tiny Falcon-H1 moves by 1.2e-4 (float32 rounding is ~1e-6: tight tolerance).
    """
    from sftkit.batch import collate_packed

    param = next(model.parameters())
    if param.device.type == "meta":
        return
    config: Any = model.config
    vocab = int(config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(0)
    # 8 + 8 tokens: sequence-parallel layers split rows over up to 8 tensor-parallel ranks;
    # longer than the tiny test models' windows and chunks (6), so those show too.
    first, second = (torch.randint(1, vocab, (n,), generator=g).tolist() for n in (8, 8))
    batch = collate_packed([(first, [1] * 8), (second, [1] * 8)], [[0, 1]], 16, pad_id=0)
    batch = batch.to(param.device)
    alone = torch.tensor([second], device=param.device)
    was_training = model.training
    impl = getattr(config, "_attn_implementation", None)
    model.eval()
    try:
        ours = model(input_ids=alone, use_cache=False).logits[0].float()
        set_attention_implementation(model, "eager")
        ref = model(input_ids=alone, use_cache=False).logits[0].float()
        set_attention_implementation(model, impl)  # type: ignore[arg-type]
        try:
            packed = model(**batch.model_kwargs(), use_cache=False).logits[0, 8:].float()
        except (ValueError, RuntimeError, NotImplementedError) as exc:  # e.g. HF refuses
            raise ValueError(_leak_message(model, f"it fails on packed rows: {exc}")) from exc
    finally:
        set_attention_implementation(model, impl)  # type: ignore[arg-type]
        model.train(was_training)
        # FSDP2 keeps the root's parameters unsharded after its forward (backward would
        # need them); an optimizer built now would hold those temporary tensors instead of
        # the sharded parameters (root weights never trained, DCP saves fail: KeyError).
        reshard = getattr(model, "reshard", None)
        if callable(reshard):
            reshard()
    tol = (2e-5 if param.dtype == torch.float32 else 3e-2) * max(1.0, float(ref.abs().max()))
    err = float((ours - ref).abs().max())
    if err > tol:
        raise ValueError(
            f"model_type {config.model_type!r}: sftkit's packed attention gives other logits "
            f"than HF's eager attention on one document (by {err:.3g}): the model uses an "
            "attention feature sftkit does not implement. Disable policy.sequence_packing "
            "(and context parallelism) for this model"
        )
    err = float((packed - ours).abs().max())
    if err > tol:
        raise ValueError(_leak_message(model, f"a document's logits move by {err:.3g} when "
                                              "another precedes it"))  # fmt: skip


def _leak_message(model: nn.Module, what: str) -> str:
    return (
        f"{type(model).__name__} leaks across packed documents ({what}): some layer outside "
        "transformers' attention interface (recurrent, convolutional or linear attention) "
        "carries state across boundaries. Disable policy.sequence_packing for this model "
        "(policy.dynamic_batching avoids padding without packing)."
    )
