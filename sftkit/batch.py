"""The micro-batch every layer shares: `PackedBatch` and the two collations that build it.

It lives at the package level because the data layer builds it, the model layer reads its
document boundaries (packed attention) and the train layer computes the loss from it;
keeping it here lets `sftkit.model` and `sftkit.train` use it without importing the data
pipeline.

Label convention (Hugging Face): `labels` is aligned with `input_ids`; `labels[t]` is the
token at `t` when it is a trained target and -100 otherwise. The loss shifts internally:
the hidden state at `t` predicts `labels[t + 1]`. Position 0 of a row, and the first token
of every packed document, is never a target, so packing never trains a document's first
token on the previous document's last token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100

Example = tuple[list[int], list[int]]  # (input_ids, loss_mask); loss_mask[i] == 1: token i trained


def round_up(n: int, multiple: int) -> int:
    """Round `n` up to a multiple of `multiple` (>= 1)."""
    return -(-n // multiple) * multiple


@dataclass
class PackedBatch:
    """One micro-batch as tensors (padded rows or packed rows).

    `labels[t] = input_ids[t]` where token t is trained, else -100 (HF convention: the loss
    shifts, so position t predicts `labels[t + 1]`). Padding is on the right.
    """

    input_ids: Tensor  # [rows, T] int64
    labels: Tensor  # [rows, T] int64, -100 where not trained
    position_ids: Tensor  # [rows, T] int64, restarting at 0 per document
    cu_seqlens: Tensor | None  # [segments + 1] int32 over the flattened rows; None when padded
    max_seqlen: int  # longest segment (packed) or T (padded)
    num_target_tokens: int  # trained target positions after the shift
    # [rows, T] 1 on example tokens, 0 on padding: HF's `attention_mask`, for statistics
    # that must not count pads (an MoE router's balancing loss); None on CP shards.
    real_tokens: Tensor | None = None

    def to(self, device: torch.device | str) -> PackedBatch:
        """Copy the tensors to `device` (asynchronously when it is a GPU)."""
        non_blocking = torch.device(device).type == "cuda"
        moved: dict[str, Any] = {
            f.name: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**moved)

    def hidden_and_targets(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(hidden states or logits that predict a target, their targets): position t
        predicts `labels[t + 1]`, so the last position has none. Context-parallel shards
        carry targets shifted before the split (`sftkit.model.context_parallel`)."""
        return hidden[:, :-1], self.labels[:, 1:]

    def model_kwargs(self) -> dict[str, object]:
        """Keyword arguments for an HF decoder forward.

        Packed rows add transformers' flash-varlen names (`cu_seq_lens_q/k`,
        `max_length_q/k`), which reach every attention function through `**kwargs`; the
        `sftkit_packed` attention (and HF's flash_attention_2) isolate documents with them.
        Position ids alone do NOT isolate documents on sdpa, eager or flex in transformers 5.
        """
        kwargs: dict[str, object] = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.cu_seqlens is not None:
            kwargs |= {
                "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_seqlen,
                "max_length_k": self.max_seqlen,
            }
        return kwargs


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    if len(ids) != len(mask):
        raise ValueError(f"input_ids has {len(ids)} tokens but loss_mask has {len(mask)}")
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def _count_targets(labels: Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def collate_padded(examples: list[Example], pad_id: int, multiple_of: int) -> PackedBatch:
    """One example per row, right-padded to the longest rounded up to `multiple_of`."""
    if not examples:
        raise ValueError("cannot collate an empty micro-batch")
    width = round_up(max(len(ids) for ids, _ in examples), max(1, multiple_of))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, mask) in enumerate(examples):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[r, : len(ids)] = torch.tensor(_labels(ids, mask), dtype=torch.long)
    # Pads keep counting up: with right padding and causal attention they only follow real
    # tokens, so their positions never reach a trained token.
    position_ids = torch.arange(width, dtype=torch.long).expand(len(examples), width).clone()
    real = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (ids, _) in enumerate(examples):
        real[r, : len(ids)] = 1
    return PackedBatch(
        input_ids, labels, position_ids, None, width, _count_targets(labels), real_tokens=real
    )


def collate_packed(
    examples: list[Example], bins: list[list[int]], row_tokens: int, pad_id: int
) -> PackedBatch:
    """One row per bin: the bin's examples back to back, right-padded to `row_tokens`.

    Every document (and each row's pad tail) is a segment of `cu_seqlens`, flattened over
    rows; position ids restart at 0 per segment; each document's first label is -100.
    """
    if not bins:
        raise ValueError("cannot collate an empty micro-batch")
    input_ids = torch.full((len(bins), row_tokens), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), row_tokens), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), row_tokens), dtype=torch.long)
    real = torch.zeros((len(bins), row_tokens), dtype=torch.long)
    boundaries = [0]
    for r, bin_ in enumerate(bins):
        start = 0
        for i in bin_:
            ids, mask = examples[i]
            if not ids:
                raise ValueError(f"example {i} has no tokens; drop empty examples before packing")
            end = start + len(ids)
            if end > row_tokens:
                raise ValueError(
                    f"bin {r} holds {sum(len(examples[j][0]) for j in bin_)} tokens but rows "
                    f"hold {row_tokens}; pack with capacity <= row_tokens"
                )
            doc_labels = _labels(ids, mask)
            doc_labels[0] = IGNORE_INDEX  # never predicted from the previous document
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            labels[r, start:end] = torch.tensor(doc_labels, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(ids))
            real[r, start:end] = 1
            start = end
            boundaries.append(r * row_tokens + end)
        if start < row_tokens:  # the pad tail is a segment of its own
            position_ids[r, start:] = torch.arange(row_tokens - start)
            boundaries.append((r + 1) * row_tokens)
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedBatch(
        input_ids, labels, position_ids, cu_seqlens, max_seqlen, _count_targets(labels),
        real_tokens=real,
    )  # fmt: skip
