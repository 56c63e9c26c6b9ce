"""Bin packing, dynamic batching (sftkit.data.packing) and collation (sftkit.batch), plus the packing bench."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from sftkit.batch import IGNORE_INDEX, collate_packed, collate_padded, round_up
from sftkit.data.packing import PACKING_ALGORITHMS, dynamic_microbatches, pack_sequences

ROOT = Path(__file__).resolve().parents[3]


def _random_case(seed: int) -> tuple[list[int], int]:
    rng = random.Random(seed)
    capacity = rng.choice([7, 16, 100, 1024])
    n = rng.randint(0, 120)
    shape = rng.choice(["uniform", "small", "large", "lognormal"])
    lengths = []
    for _ in range(n):
        if shape == "uniform":
            x = rng.randint(1, capacity)
        elif shape == "small":
            x = rng.randint(1, max(1, capacity // 6))
        elif shape == "large":
            x = rng.randint(capacity // 2, capacity)
        else:
            x = round(rng.lognormvariate(0, 1) * capacity / 6)
        lengths.append(min(capacity, max(1, x)))
    return lengths, capacity


def _check_partition(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths))), "every index exactly once"
    assert all(b for b in bins), "no empty bins"
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins), "bin over capacity"


@pytest.mark.parametrize("algorithm", PACKING_ALGORITHMS)
def test_every_algorithm_places_each_example_once_within_capacity(algorithm: str) -> None:
    for seed in range(150):
        lengths, capacity = _random_case(seed)
        bins = pack_sequences(lengths, capacity, algorithm, seed=seed)
        _check_partition(bins, lengths, capacity)
        assert bins == pack_sequences(lengths, capacity, algorithm, seed=seed), "deterministic"


@pytest.mark.parametrize("algorithm", PACKING_ALGORITHMS)
def test_item_over_capacity_or_empty_is_an_error(algorithm: str) -> None:
    with pytest.raises(ValueError, match="sequence 1 has 11 tokens"):
        pack_sequences([3, 11, 2], 10, algorithm)
    with pytest.raises(ValueError, match="sequence 0 has 0 tokens"):
        pack_sequences([0, 2], 10, algorithm)
    with pytest.raises(ValueError, match="unknown packing algorithm"):
        pack_sequences([1], 10, "best_fit")  # type: ignore[arg-type]


def test_concatenative_keeps_order() -> None:
    # The example from NeMo RL's ConcatenativePacker docstring.
    lengths = [4, 1, 3, 2, 1, 3, 4, 5]
    assert pack_sequences(lengths, 5, "concatenative") == [[0, 1], [2, 3], [4, 5], [6], [7]]
    assert pack_sequences(lengths, 8, "concatenative") == [[0, 1, 2], [3, 4, 5], [6], [7]]


def test_decreasing_algorithms_pack_tighter_than_concatenation() -> None:
    lengths, capacity = [6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1], 10  # 36 tokens: 4 bins at best
    assert len(pack_sequences(lengths, capacity, "first_fit_decreasing")) == 4
    assert len(pack_sequences(lengths, capacity, "modified_first_fit_decreasing")) == 4
    assert len(pack_sequences(lengths, capacity, "concatenative")) > 4


@pytest.mark.parametrize("algorithm", PACKING_ALGORITHMS[:3])
def test_first_fit_family_leaves_at_most_one_bin_half_empty(algorithm: str) -> None:
    # First fit never opens a bin while an earlier one has room: two bins at most half full
    # would have been merged. MFFD's first bins hold a large item (> C/2) each.
    for seed in range(60):
        lengths, capacity = _random_case(seed)
        bins = pack_sequences(lengths, capacity, algorithm, seed=seed)
        assert sum(2 * sum(lengths[i] for i in b) <= capacity for b in bins) <= 1


def test_first_fit_shuffle_depends_on_seed_only() -> None:
    lengths = [random.Random(7).randint(1, 50) for _ in range(60)]
    results = {str(pack_sequences(lengths, 64, "first_fit_shuffle", seed=s)) for s in range(5)}
    assert len(results) > 1


@pytest.mark.parametrize("algorithm", PACKING_ALGORITHMS)
def test_bin_count_constraints(algorithm: str) -> None:
    lengths = [3] * 9  # fits in 1 bin of 32
    bins = pack_sequences(lengths, 32, algorithm, min_bin_count=4)
    assert len(bins) == 4
    _check_partition(bins, lengths, 32)
    bins = pack_sequences(lengths, 10, algorithm, bin_count_multiple=4)  # 3 bins -> 4
    assert len(bins) == 4
    _check_partition(bins, lengths, 10)
    bins = pack_sequences(lengths, 10, algorithm, min_bin_count=5, bin_count_multiple=3)
    assert len(bins) == 6
    _check_partition(bins, lengths, 10)
    with pytest.raises(ValueError, match="cannot make 12 bins"):
        pack_sequences(lengths, 32, algorithm, min_bin_count=10, bin_count_multiple=4)


def test_dynamic_microbatches_respect_the_budget() -> None:
    for seed in range(60):
        rng = random.Random(seed)
        round_to = rng.choice([1, 8, 64])
        max_tokens = rng.choice([256, 1000, 4096])
        lengths = [rng.randint(1, max_tokens - round_to + 1) for _ in range(rng.randint(1, 80))]
        batches = dynamic_microbatches(lengths, max_tokens, round_to)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) * round_up(max(lengths[i] for i in b), round_to) <= max_tokens
    with pytest.raises(ValueError, match="130 after rounding"):
        dynamic_microbatches([10, 129], 128, 10)


def test_dynamic_microbatches_group_similar_lengths() -> None:
    assert dynamic_microbatches([100, 5, 90, 6, 7], 200, 1) == [[1, 3, 4], [2, 0]]
    assert dynamic_microbatches([100, 5, 90, 6, 7], 199, 1) == [[1, 3, 4], [2], [0]]


EXAMPLES = [
    ([11, 12, 13, 14], [0, 0, 1, 1]),
    ([21, 22, 23], [0, 1, 1]),
    ([31, 32, 33, 34, 35], [1, 1, 0, 1, 1]),  # a target at position 0 is never predicted
    ([41, 42], [0, 1]),
]


def test_collate_padded() -> None:
    batch = collate_padded(EXAMPLES, pad_id=0, multiple_of=4)
    assert batch.input_ids.shape == (4, 8) and batch.cu_seqlens is None and batch.max_seqlen == 8
    assert batch.input_ids[1].tolist() == [21, 22, 23, 0, 0, 0, 0, 0]
    assert batch.labels[0].tolist() == [-100, -100, 13, 14] + [-100] * 4
    assert batch.labels[2].tolist()[:5] == [31, 32, -100, 34, 35]
    assert batch.num_target_tokens == 2 + 2 + 3 + 1
    assert batch.position_ids[3].tolist() == list(range(8))


def test_collate_packed_masks_survive_and_positions_restart() -> None:
    bins = [[2, 0], [1, 3]]
    batch = collate_packed(EXAMPLES, bins, row_tokens=10, pad_id=0)
    assert batch.input_ids.shape == (2, 10)
    assert batch.input_ids[0].tolist() == [31, 32, 33, 34, 35, 11, 12, 13, 14, 0]
    assert batch.labels[0].tolist() == [-100, 32, -100, 34, 35, -100, -100, 13, 14, -100]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    # Documents and each row's pad tail are segments over the flattened rows.
    assert batch.cu_seqlens.tolist() == [0, 5, 9, 10, 13, 15, 20]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.max_seqlen == 5
    # Same trained targets as one example per row: packing adds and drops none.
    assert batch.num_target_tokens == collate_padded(EXAMPLES, 0, 1).num_target_tokens
    kwargs = batch.model_kwargs()
    assert kwargs["cu_seq_lens_q"] is batch.cu_seqlens and kwargs["max_length_k"] == 5


def test_collate_packed_first_token_of_a_document_is_never_a_target() -> None:
    rng = random.Random(0)
    examples = []
    for _ in range(40):
        n = rng.randint(1, 20)
        examples.append(([rng.randint(1, 99) for _ in range(n)], [1] * n))
    lengths = [len(ids) for ids, _ in examples]
    bins = pack_sequences(lengths, 48, "modified_first_fit_decreasing")
    batch = collate_packed(examples, bins, 48, 0)
    starts = batch.position_ids == 0
    assert (batch.labels[starts] == IGNORE_INDEX).all()
    assert batch.num_target_tokens == sum(n - 1 for n in lengths)
    assert int((batch.input_ids != 0).sum()) == sum(lengths)


def test_collate_packed_rejects_overfull_rows() -> None:
    with pytest.raises(ValueError, match="bin 0 holds 9 tokens but rows hold 8"):
        collate_packed(EXAMPLES, [[0, 2]], row_tokens=8, pad_id=0)


def _bench():  # bench/ is not a package: import bench/packing.py by path
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import packing as bench
    finally:
        sys.path.pop(0)
    return bench


def test_documented_distribution_packs_at_least_97_percent() -> None:
    bench = _bench()
    for setup in (bench.TINY, bench.GPU):
        assert bench.packing_efficiency(setup, seed=1234) >= 0.97


@pytest.mark.slow
def test_packing_bench_tiny_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    threads = torch.get_num_threads()
    try:
        args = ["--tiny", "--threads", "1", "--global-batch", "32", "--steps", "1"]
        _bench().main([*args, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["distribution"]["packing_efficiency"] >= 0.97
    assert rows["packed"]["padding_fraction"] < 0.03 < rows["padded"]["padding_fraction"]
    # Same data, same initial weights: the first step's loss must not depend on packing.
    assert rows["packed"]["first_step_loss"] == pytest.approx(rows["padded"]["first_step_loss"])
    assert rows["packed"]["real_tokens_per_s"] > 0 and rows["summary"]["packed_over_padded"] > 0
