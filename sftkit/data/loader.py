"""Global batches, their split over data-parallel ranks, and micro-batches.

Data order is a pure function of (seed, epoch): each epoch's permutation comes from a
generator seeded with `seed + epoch`, and the sampler's whole state is two integers
(epoch, batches consumed this epoch). That makes resume exact and the state file
loadable with `torch.load(weights_only=True)` without an allow-list. A weighted mixture
(`MixtureSampler`) adds one integer per dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from sftkit.batch import PackedBatch, collate_packed, collate_padded, round_up
from sftkit.data.packing import dynamic_microbatches, pack_sequences
from sftkit.data.types import Example, ExampleSet, Source

T = TypeVar("T")


class GlobalBatchSampler:
    """Yields lists of example indices, `global_batch_size` at a time, epoch after epoch.

    The last partial batch of an epoch is dropped (as NeMo RL's `drop_last=True`); those
    examples are seen in other epochs when shuffling is on.
    """

    def __init__(self, num_examples: int, global_batch_size: int, shuffle: bool, seed: int):
        if num_examples < global_batch_size:
            raise ValueError(
                f"the training set has {num_examples} examples, fewer than "
                f"policy.train_global_batch_size={global_batch_size}; lower the batch size "
                "or add data"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # global batches already taken from this epoch
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        if self._cached is None or self._cached[0] != epoch:  # one permutation per epoch
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(self.num_examples, generator=generator))
        return self._cached[1]

    def next_batch(self) -> list[int] | None:
        """The next global batch of this epoch, or None (and the epoch advances) at its end."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            return None
        start = self.position * self.global_batch_size
        self.position += 1
        return self._order(self.epoch)[start : start + self.global_batch_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class MixtureSampler(GlobalBatchSampler):
    """Global batches drawn from several datasets in proportion to their weights.

    Sample `k` of the run comes from the dataset furthest behind its share (`k * w_i /
    sum(w)` minus what it has given), so every batch holds the weights' proportions to
    within one sample and the running fraction never drifts. Within a dataset samples
    follow a seeded permutation per pass: nothing repeats before the dataset is
    exhausted, then the next pass reshuffles. An epoch is as many samples as all datasets
    hold. The state is integers only: (epoch, position) and the samples drawn per dataset.
    """

    def __init__(
        self, sources: list[Source], global_batch_size: int, shuffle: bool, seed: int
    ) -> None:
        super().__init__(sum(s.size for s in sources), global_batch_size, shuffle, seed)
        weights = [float(s.weight or 0) for s in sources]
        self.sources = sources
        self.shares = [w / sum(weights) for w in weights]
        self.drawn = [0] * len(sources)  # samples taken from each dataset, all epochs
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    def next_batch(self) -> list[int] | None:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            return None
        batch = [self._draw() for _ in range(self.global_batch_size)]
        if self.shuffle:  # mix the datasets over the batch (and so over the ranks)
            step = self.epoch * self.batches_per_epoch + self.position
            generator = torch.Generator().manual_seed(self.seed + 7919 * (step + 1))
            batch = [batch[i] for i in torch.randperm(len(batch), generator=generator).tolist()]
        self.position += 1
        return batch

    def _draw(self) -> int:
        total = sum(self.drawn) + 1
        k = max(range(len(self.sources)), key=lambda i: total * self.shares[i] - self.drawn[i])
        source = self.sources[k]
        rounds, pos = divmod(self.drawn[k], source.size)
        self.drawn[k] += 1
        return source.start + int(self._permutation(k, rounds)[pos])

    def _permutation(self, k: int, rounds: int) -> torch.Tensor:
        cached = self._perms.get(k)
        if cached is None or cached[0] != rounds:
            size = self.sources[k].size
            if self.shuffle:
                seed = int(np.random.SeedSequence([self.seed, k, rounds]).generate_state(1)[0])
                perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
            else:
                perm = torch.arange(size)
            cached = self._perms[k] = (rounds, perm)
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "drawn": list(self.drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.drawn = [int(n) for n in state["drawn"]]


def build_sampler(
    examples: ExampleSet, global_batch_size: int, shuffle: bool, seed: int
) -> GlobalBatchSampler:
    """A `MixtureSampler` when the training datasets carry weights, else NeMo RL's
    concatenation (one permutation of all examples per epoch)."""
    if examples.sources and all(s.weight is not None for s in examples.sources):
        empty = [s.name for s in examples.sources if s.size == 0]
        if empty:
            raise ValueError(
                f"training dataset {empty[0]!r} has no examples left after the length policy, "
                "so its weight cannot be honoured; remove it from data.train or fix its data."
            )
        return MixtureSampler(examples.sources, global_batch_size, shuffle, seed)
    return GlobalBatchSampler(len(examples), global_batch_size, shuffle, seed)


@dataclass
class BatchPlan:
    """How one rank turns its share of a global batch into micro-batches."""

    micro_batch_size: int
    multiple_of: int = 1
    pad_id: int = 0
    mode: str = "padded"  # padded | packed | dynamic
    mb_tokens: int | None = None  # token budget per micro-batch (packed / dynamic)
    length_round: int = 64
    algorithm: str = "modified_first_fit_decreasing"
    seed: int = 0

    def __post_init__(self) -> None:
        # The budget is derived once at load (train_mb_tokens = max_total_sequence_length x
        # train_micro_batch_size, sftkit.config.derive); there is no second default here.
        if self.mode != "padded" and self.mb_tokens is None:
            raise ValueError(f"a {self.mode} BatchPlan needs mb_tokens (train_mb_tokens)")


def rank_share(items: Sequence[T], rank: int, ranks: int) -> list[T]:
    """Contiguous block of a batch for data-parallel rank `rank` of `ranks` (NeMo RL's
    sharding), for training and validation alike. Training batches split evenly (the global
    batch size is checked against the data-parallel size before the model loads); a short
    last validation batch gives the first `len % ranks` ranks one item more."""
    per_rank, extra = divmod(len(items), ranks)
    start = rank * per_rank + min(rank, extra)
    return list(items[start : start + per_rank + (rank < extra)])


def micro_batches(examples: list[Example], plan: BatchPlan) -> list[PackedBatch]:
    """Split one rank's examples into collated micro-batches according to `plan`."""
    pairs = [(e.input_ids, e.loss_mask) for e in examples]
    if plan.mode == "padded":
        size = plan.micro_batch_size
        return [
            collate_padded(pairs[i : i + size], plan.pad_id, plan.multiple_of)
            for i in range(0, len(pairs), size)
        ]
    lengths = [len(ids) for ids, _ in pairs]
    budget = plan.mb_tokens
    assert budget is not None  # BatchPlan.__post_init__
    if plan.mode == "dynamic":
        groups = dynamic_microbatches(lengths, budget, max(plan.length_round, plan.multiple_of))
        return [
            collate_padded([pairs[i] for i in group], plan.pad_id, plan.multiple_of)
            for group in groups
        ]
    bins = pack_sequences(lengths, budget, plan.algorithm, seed=plan.seed)  # type: ignore[arg-type]
    batches = []
    for bin_ in bins:
        used = sum(lengths[i] for i in bin_)
        width = min(budget, round_up(used, max(plan.length_round, plan.multiple_of)))
        width = max(width, used)
        batches.append(collate_packed(pairs, [bin_], width, plan.pad_id))
    return batches


def dummy_micro_batch(pad_id: int) -> PackedBatch:
    """A one-token batch with no targets, so ranks with fewer micro-batches stay in step."""
    return collate_padded([([pad_id], [0])], pad_id, 1)


def iterate_eval_batches(
    examples: Sequence[Example], batch_size: int, max_batches: int
) -> Iterator[list[Example]]:
    """Validation batches in a fixed order; `max_batches <= 0` means the whole set."""
    count = 0
    for start in range(0, len(examples), batch_size):
        if 0 < max_batches <= count:
            return
        yield list(examples[start : start + batch_size])
        count += 1
