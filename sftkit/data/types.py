"""What the data pipeline hands to the training loop."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import numpy as np

DIGEST_CHUNK = 1 << 24  # tokens hashed per update: bounds the digest's memory


@dataclass
class Example:
    """One tokenized conversation.

    `loss_mask[i] == 1` when token `i` is a trained target (the loop shifts labels itself).
    """

    input_ids: list[int]
    loss_mask: list[int]
    task_name: str
    truncated: bool = False


@dataclass(frozen=True)
class Source:
    """One named dataset's examples: positions `[start, stop)` of its split."""

    name: str
    start: int
    stop: int
    weight: float | None = None  # relative sampling weight (data.train entries only)

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class ExampleSet(Sequence[Example]):
    """A split's examples, read from (memory-mapped) flat arrays one example at a time.

    `ids`/`mask` hold every kept example's tokens end to end, `ends[i]` is where example
    `i` ends (`base` is where the first begins), `task[i]` indexes `task_names`. Only the
    examples a batch asks for become Python lists, so memory follows the batch, not the
    data. `sources` name the datasets the split was built from, in order.
    """

    ids: np.ndarray
    mask: np.ndarray
    ends: np.ndarray
    task: np.ndarray
    truncated_flags: np.ndarray
    task_names: list[str]
    sources: list[Source] = field(default_factory=list)
    base: int = 0

    @classmethod
    def empty(cls) -> ExampleSet:
        none = np.zeros(0, dtype=np.int64)
        return cls(none.astype(np.int32), none.astype(np.uint8), none, none.astype(np.int32),
                   none.astype(np.uint8), [])  # fmt: skip

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, k: int) -> Example: ...
    @overload
    def __getitem__(self, k: slice) -> list[Example]: ...
    def __getitem__(self, k: int | slice) -> Example | list[Example]:
        if isinstance(k, slice):
            return [self._example(i) for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._example(k)

    def __iter__(self) -> Iterator[Example]:
        return (self._example(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def _example(self, i: int) -> Example:
        start = int(self.ends[i - 1]) if i else self.base
        stop = int(self.ends[i])
        return Example(
            self.ids[start:stop].tolist(),
            self.mask[start:stop].tolist(),
            self.task_names[int(self.task[i])],
            bool(self.truncated_flags[i]),
        )

    def lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.diff(np.asarray(self.ends), prepend=self.base)

    def num_tokens(self) -> int:
        return int(self.ends[-1]) - self.base if len(self) else 0

    def mean_length(self) -> float:
        return self.num_tokens() / max(len(self), 1)

    def part(self, source: Source) -> ExampleSet:
        """The examples of one source (a view: nothing is copied)."""
        lo, hi = source.start, source.stop
        base = int(self.ends[lo - 1]) if lo else self.base
        return replace(
            self,
            ends=self.ends[lo:hi],
            task=self.task[lo:hi],
            truncated_flags=self.truncated_flags[lo:hi],
            sources=[replace(source, start=0, stop=hi - lo)],
            base=base,
        )

    def parts(self) -> list[tuple[str, ExampleSet]]:
        """(name, examples) per source, in order."""
        return [(s.name, self.part(s)) for s in self.sources]

    def sample_counts(
        self, indices: Sequence[int], prefix: str = "train/samples/"
    ) -> dict[str, int]:
        """How many of `indices` come from each source, keyed `<prefix><name>`."""
        stops = np.asarray([s.stop for s in self.sources], dtype=np.int64)
        counts = np.bincount(
            np.searchsorted(stops, np.asarray(indices, dtype=np.int64), side="right"),
            minlength=len(self.sources),
        )
        return {f"{prefix}{s.name}": int(c) for s, c in zip(self.sources, counts, strict=False)}

    def digest(self) -> str:
        """Hash of every example's tokens and mask, the task names and the sources."""
        h = hashlib.sha256()
        h.update(repr([(s.name, s.start, s.stop, s.weight) for s in self.sources]).encode())
        h.update(np.ascontiguousarray(self.lengths(), dtype=np.int64).tobytes())
        lo, hi = self.base, self.base + self.num_tokens()
        for a in range(lo, hi, DIGEST_CHUNK):
            b = min(a + DIGEST_CHUNK, hi)
            h.update(np.ascontiguousarray(self.ids[a:b]).tobytes())
            h.update(np.ascontiguousarray(self.mask[a:b]).tobytes())
        return h.hexdigest()[:16]

    def with_weights(self, weights: dict[str, float | None]) -> ExampleSet:
        """The same examples with each source's sampling weight set."""
        return replace(self, sources=[replace(s, weight=weights.get(s.name)) for s in self.sources])


@dataclass
class PreparedData:
    """Tokenized train and validation sets plus counts of what the length policy did.

    `report` keys are `<split>/<count>`, e.g. `train/examples`, `train/truncated`,
    `train/dropped_overlong`, `train/masked_overlong`, `train/dropped_untrainable`,
    `train/dropped_oversize`, `train/tokens`, `train/trained_tokens`, and `cache_hit`
    (1 when read from the cache).
    """

    train: ExampleSet
    validation: ExampleSet
    report: dict[str, int] = field(default_factory=dict)
