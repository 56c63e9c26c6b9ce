"""Sequence packing, dynamic batching and collation into micro-batch tensors.

Two ways to cut a global batch into micro-batches (mutually exclusive, as in NeMo RL):

* **Packing** (`pack_sequences` + `collate_packed`): bin-pack whole examples into rows of
  `capacity` tokens. Each packed row carries per-document position ids and `cu_seqlens`
  boundaries, so the attention (see `sftkit.model.attention`) never crosses a document.
* **Dynamic batching** (`dynamic_microbatches` + `collate_padded`): group examples of similar
  length so that `rows x padded length` stays within a token budget.

Label convention (Hugging Face): `labels` is aligned with `input_ids`; `labels[t]` is the
token at `t` when it is a trained target and -100 otherwise. The loss shifts internally:
the hidden state at `t` predicts `labels[t + 1]`. Position 0 of a row, and the first token
of every packed document, is never a target, so packing never trains a document's first
token on the previous document's last token.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100

PackingAlgorithm = Literal[
    "modified_first_fit_decreasing", "first_fit_decreasing", "first_fit_shuffle", "concatenative"
]
PACKING_ALGORITHMS: tuple[str, ...] = (
    "modified_first_fit_decreasing",
    "first_fit_decreasing",
    "first_fit_shuffle",
    "concatenative",
)

Example = tuple[list[int], list[int]]  # (input_ids, loss_mask); loss_mask[i] == 1: token i trained


# --------------------------------------------------------------------------------------
# Bin packing
# --------------------------------------------------------------------------------------


class _FirstFitBins:
    """Open bins with a max segment tree over free space: first fit in O(log n) per item.

    A plain scan over open bins is O(n * bins); a global batch of 50k short chats would
    then take seconds per step on the host.
    """

    def __init__(self, capacity: int, max_bins: int) -> None:
        self.capacity = capacity
        self.size = 1
        while self.size < max(1, max_bins):
            self.size *= 2
        # Unopened bins count as fully free, so "leftmost bin with room" also opens new bins
        # in order.
        self.tree = [capacity] * (2 * self.size)
        self.bins: list[list[int]] = []

    def add(self, index: int, length: int) -> None:
        """Place item `index` of `length` tokens into the first bin with room."""
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
        slot = node - self.size
        if slot == len(self.bins):
            self.bins.append([])
        self.bins[slot].append(index)
        self.tree[node] -= length
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2


def _first_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    packer = _FirstFitBins(capacity, len(order))
    for i in order:
        packer.add(i, lengths[i])
    return packer.bins


def _decreasing(indices: list[int], lengths: list[int]) -> list[int]:
    # Ties broken by index so the result does not depend on sort stability details.
    return sorted(indices, key=lambda i: (-lengths[i], i))


def _concatenative(lengths: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    used = capacity + 1  # forces a new bin for the first item
    for i, length in enumerate(lengths):
        if used + length > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += length
    return bins


def _take_largest_fitting(pool: list[tuple[int, int]], room: int) -> tuple[int, int] | None:
    """Pop the largest (length, index) of an ascending `pool` with length <= room."""
    pos = bisect.bisect_right(pool, (room, float("inf"))) - 1
    return pool.pop(pos) if pos >= 0 else None


def _modified_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Johnson & Garey (1985) MFFD, the NeMo RL default.

    Items are large (> C/2), medium (C/3, C/2], small (C/6, C/3] or tiny. One bin per large
    item; then medium items into large bins (forward), pairs of small items into bins
    without a medium (backward), the largest remaining item that fits (forward), and FFD
    for what is left.
    """
    classes: dict[str, list[tuple[int, int]]] = {"large": [], "medium": [], "small": [], "tiny": []}
    for i, length in enumerate(lengths):
        if 2 * length > capacity:
            kind = "large"
        elif 3 * length > capacity:
            kind = "medium"
        elif 6 * length > capacity:
            kind = "small"
        else:
            kind = "tiny"
        classes[kind].append((length, i))
    large = sorted(classes["large"], key=lambda x: (-x[0], x[1]))
    medium = sorted(classes["medium"])  # ascending; take the largest that fits
    small = sorted(classes["small"])
    bins = [[i] for _, i in large]
    free = [capacity - length for length, _ in large]
    has_medium = [False] * len(bins)

    for b in range(len(bins)):  # phase 2: forward, the largest medium that fits
        item = _take_largest_fitting(medium, free[b]) if medium else None
        if item is not None:
            bins[b].append(item[1])
            free[b] -= item[0]
            has_medium[b] = True

    for b in reversed(range(len(bins))):  # phase 3: backward, two small items
        if has_medium[b] or len(small) < 2 or small[0][0] + small[1][0] > free[b]:
            continue
        first = small.pop(0)
        second = _take_largest_fitting(small, free[b] - first[0])
        assert second is not None  # small[0] (was small[1]) fits by the check above
        bins[b] += [first[1], second[1]]
        free[b] -= first[0] + second[0]

    rest = sorted(medium + small + classes["tiny"])
    for b in range(len(bins)):  # phase 4: forward, the largest remaining item that fits
        while rest and rest[0][0] <= free[b]:
            length, i = _take_largest_fitting(rest, free[b])  # type: ignore[misc]
            bins[b].append(i)
            free[b] -= length

    leftovers = [i for _, i in sorted(rest, key=lambda x: (-x[0], x[1]))]
    return bins + _first_fit(leftovers, lengths, capacity)  # phase 5: FFD


def _adjust_bin_count(bins: list[list[int]], min_bin_count: int, multiple: int) -> list[list[int]]:
    """Split single items off the fullest-by-count bins until the bin count constraints hold.

    Data-parallel ranks need the same number of bins (`min_bin_count = bin_count_multiple =
    dp_size` in NeMo RL); a moved item alone in a new bin always fits.
    """
    target = max(len(bins), min_bin_count)
    target += -target % multiple
    total = sum(len(b) for b in bins)
    if target > total:
        raise ValueError(
            f"cannot make {target} bins (min_bin_count={min_bin_count}, "
            f"bin_count_multiple={multiple}) from {total} sequences: every bin needs one "
            "sequence; use a larger global batch or fewer data-parallel ranks"
        )
    bins = [list(b) for b in bins]
    donors = sorted(range(len(bins)), key=lambda j: (-len(bins[j]), j))
    d = 0
    while len(bins) < target:
        while len(bins[donors[d]]) < 2:
            d += 1
        bins.append([bins[donors[d]].pop()])
    return bins


def pack_sequences(
    lengths: list[int],
    capacity: int,
    algorithm: PackingAlgorithm,
    seed: int = 0,
    min_bin_count: int = 1,
    bin_count_multiple: int = 1,
) -> list[list[int]]:
    """Bin-pack sequence `lengths` into bins of at most `capacity` tokens.

    Returns the indices into `lengths` per bin; every index appears exactly once. The result
    depends only on the arguments (`first_fit_shuffle` draws its order from `seed`).
    """
    if algorithm not in PACKING_ALGORITHMS:
        raise ValueError(
            f"unknown packing algorithm {algorithm!r}; choose one of {', '.join(PACKING_ALGORITHMS)}"
        )
    if capacity <= 0:
        raise ValueError(f"packing capacity must be positive, got {capacity}")
    if min_bin_count < 0 or bin_count_multiple < 1:
        raise ValueError(
            f"need min_bin_count >= 0 and bin_count_multiple >= 1, got {min_bin_count} and "
            f"{bin_count_multiple}"
        )
    for i, length in enumerate(lengths):
        if length <= 0 or length > capacity:
            raise ValueError(
                f"sequence {i} has {length} tokens but packed rows hold 1..{capacity}; raise "
                "policy.sequence_packing.train_mb_tokens or truncate/drop long examples "
                "(policy.max_total_sequence_length)"
            )
    order = list(range(len(lengths)))
    if algorithm == "concatenative":
        bins = _concatenative(lengths, capacity)
    elif algorithm == "first_fit_decreasing":
        bins = _first_fit(_decreasing(order, lengths), lengths, capacity)
    elif algorithm == "first_fit_shuffle":
        random.Random(seed).shuffle(order)
        bins = _first_fit(order, lengths, capacity)
    else:
        bins = _modified_first_fit_decreasing(lengths, capacity)
    return _adjust_bin_count(bins, min_bin_count, bin_count_multiple)


def round_up(n: int, multiple: int) -> int:
    """Round `n` up to a multiple of `multiple` (>= 1)."""
    return -(-n // multiple) * multiple


def dynamic_microbatches(lengths: list[int], max_tokens: int, round_to: int) -> list[list[int]]:
    """Group sequences into micro-batches whose padded size stays within `max_tokens`.

    Sequences are taken shortest first; a micro-batch costs `rows x round_up(longest,
    round_to)` tokens, so similar lengths share a micro-batch and little padding remains.
    Returns indices into `lengths` per micro-batch (each exactly once).
    """
    if round_to < 1:
        raise ValueError(f"sequence_length_round must be >= 1, got {round_to}")
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (lengths[j], j)):
        padded = round_up(lengths[i], round_to)
        if padded > max_tokens:
            raise ValueError(
                f"sequence {i} has {lengths[i]} tokens ({padded} after rounding to "
                f"{round_to}) but a micro-batch holds {max_tokens}; raise "
                "policy.dynamic_batching.train_mb_tokens or truncate long examples"
            )
        # Lengths ascend, so the newcomer sets the padded length of the whole micro-batch.
        if current and (len(current) + 1) * padded > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


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

    def to(self, device: torch.device | str) -> PackedBatch:
        """Copy the tensors to `device` (asynchronously when it is a GPU)."""
        non_blocking = torch.device(device).type == "cuda"
        moved: dict[str, Any] = {
            f.name: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return PackedBatch(**moved)

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
    return PackedBatch(input_ids, labels, position_ids, None, width, _count_targets(labels))


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
            start = end
            boundaries.append(r * row_tokens + end)
        if start < row_tokens:  # the pad tail is a segment of its own
            position_ids[r, start:] = torch.arange(row_tokens - start)
            boundaries.append((r + 1) * row_tokens)
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedBatch(
        input_ids, labels, position_ids, cu_seqlens, max_seqlen, _count_targets(labels)
    )
