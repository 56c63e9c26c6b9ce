"""Sequence packing and dynamic batching: which examples share a micro-batch.

Two ways to cut a global batch into micro-batches (mutually exclusive, as in NeMo RL):

* **Packing** (`pack_sequences`, then `sftkit.batch.collate_packed`): bin-pack whole
  examples into rows of `capacity` tokens. Each packed row carries per-document position ids
  and `cu_seqlens` boundaries, so the attention (see `sftkit.model.attention`) never crosses
  a document.
* **Dynamic batching** (`dynamic_microbatches`, then `sftkit.batch.collate_padded`): group
  examples of similar length so that `rows x padded length` stays within a token budget.
"""

from __future__ import annotations

import bisect
import random
from typing import Literal

from sftkit.batch import round_up

PackingAlgorithm = Literal[
    "modified_first_fit_decreasing", "first_fit_decreasing", "first_fit_shuffle", "concatenative"
]
PACKING_ALGORITHMS: tuple[str, ...] = (
    "modified_first_fit_decreasing",
    "first_fit_decreasing",
    "first_fit_shuffle",
    "concatenative",
)


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
