"""Named datasets, weighted mixtures, one validation set per dataset, bounded rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokenizer

from sftkit.config.derive import derive_config
from sftkit.config.schema import MasterConfig
from sftkit.data import DataError, prepare_data
from sftkit.data.loader import GlobalBatchSampler, MixtureSampler, build_sampler
from sftkit.data.types import Source


def _write(path: Path, n: int, tag: str = "q", extra: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(n):
            answer = f"The answer is {i}." + " more" * extra
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{tag} {i}?"},
                                             {"role": "assistant", "content": answer}]}) + "\n")  # fmt: skip
    return path


def _cfg(tmp_path: Path, train, **data) -> MasterConfig:
    cfg = MasterConfig()
    cfg.data.train = train
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.default = {"dataset_name": "openai_format"}
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return derive_config(cfg)  # derived and checked as load_config does


def _draw(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    out = []
    while len(out) < steps:
        batch = sampler.next_batch()
        if batch is not None:
            out.append(batch)
    return out


def test_three_to_one_mixture_realises_its_weights() -> None:
    sources = [Source("a", 0, 300, 3.0), Source("b", 300, 2300, 1.0)]
    sampler = MixtureSampler(sources, 16, shuffle=True, seed=7)
    assert sampler.batches_per_epoch == 2300 // 16
    batches = _draw(sampler, 160)  # 2,560 samples: dataset a is exhausted and reshuffled
    flat = [i for batch in batches for i in batch]
    from_a = [i for i in flat if i < 300]
    assert abs(len(from_a) / len(flat) - 0.75) <= 0.02
    for batch in batches:  # every step holds the proportion, not just the run
        assert abs(sum(i < 300 for i in batch) - 12) <= 1
    # no repeat before a dataset is exhausted; each pass is a fresh permutation
    first, second = from_a[:300], from_a[300:600]
    assert sorted(first) == sorted(second) == list(range(300)) and first != second
    from_b = [i for i in flat if i >= 300]
    assert len(set(from_b)) == len(from_b)  # b (2,000) is not exhausted yet


def test_mixture_is_deterministic_and_resumes_exactly() -> None:
    sources = [Source("a", 0, 50, 2.0), Source("b", 50, 90, 1.0), Source("c", 90, 100, 1.0)]
    whole = _draw(MixtureSampler(sources, 8, True, seed=3), 30)
    assert whole == _draw(MixtureSampler(sources, 8, True, seed=3), 30)
    assert whole != _draw(MixtureSampler(sources, 8, True, seed=4), 30)
    first = MixtureSampler(sources, 8, True, seed=3)
    head = _draw(first, 13)
    state = first.state_dict()
    path_state = {k: v for k, v in state.items()}
    assert set(path_state) == {"epoch", "position", "drawn"}
    resumed = MixtureSampler(sources, 8, True, seed=3)
    resumed.load_state_dict(state)
    assert head + _draw(resumed, 17) == whole
    assert resumed.epoch >= 2  # 100 examples / 8 = 12 batches per epoch


def test_state_file_is_weights_only(tmp_path: Path) -> None:
    sampler = MixtureSampler([Source("a", 0, 20, 1.0), Source("b", 20, 40, 1.0)], 4, True, 0)
    _draw(sampler, 3)
    torch.save(sampler.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == sampler.state_dict()


def test_weights_name_and_count_samples(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "alpha.jsonl", 40, "a"), _write(tmp_path / "beta.jsonl", 20, "b")
    cfg = _cfg(
        tmp_path,
        [{"data_path": str(a), "weight": 3}, {"data_path": str(b), "weight": 1, "name": "bee"}],
    )
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert [(s.name, s.size, s.weight) for s in data.train.sources] == [
        ("alpha", 40, 3.0), ("bee", 20, 1.0),
    ]  # fmt: skip
    sampler = build_sampler(data.train, 8, True, 0)
    assert isinstance(sampler, MixtureSampler)
    batch = sampler.next_batch()
    assert batch is not None
    assert data.train.sample_counts(batch) == {"train/samples/alpha": 6, "train/samples/bee": 2}
    # no weights: NeMo RL's concatenation, still counted per dataset
    plain = prepare_data(_cfg(tmp_path, [{"data_path": str(a)}, {"data_path": str(b)}]),
                         make_tokenizer("qwen25"))  # fmt: skip
    assert type(build_sampler(plain.train, 8, True, 0)) is GlobalBatchSampler
    assert plain.train.sample_counts([0, 39, 40, 59]) == {
        "train/samples/alpha": 2, "train/samples/beta": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("train", "pattern"),
    [
        ([{"w": 3}, {}], r"data.train\[1\] \(b\) has no weight but other"),
        ([{"w": 0}, {"w": 1}], r"data.train\[0\] \(a\): weight=0; use a number > 0"),
        ([{"w": "x"}, {"w": 1}], r"data.train\[0\] \(a\): weight='x'"),
        ([{"name": "same"}, {"name": "same"}], r"data.train\[0\] and data.train\[1\] are both named 'same'"),
    ],
)  # fmt: skip
def test_bad_names_and_weights_name_the_entry(tmp_path: Path, train, pattern: str) -> None:
    paths = [_write(tmp_path / "a.jsonl", 4), _write(tmp_path / "b.jsonl", 4)]
    entries = []
    for path, spec in zip(paths, train, strict=True):
        entry = {"data_path": str(path)}
        if "w" in spec:
            entry["weight"] = spec["w"]
        if "name" in spec:
            entry["name"] = spec["name"]
        entries.append(entry)
    with pytest.raises(ValueError, match=pattern):
        prepare_data(_cfg(tmp_path, entries), make_tokenizer("qwen25"))


def test_validation_sets_are_named(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", 30, "a")
    v = _write(tmp_path / "v.jsonl", 7, "v")
    cfg = _cfg(
        tmp_path,
        {"data_path": str(a), "split_validation_size": 5},
        validation=[{"data_path": str(v)}, {"data_path": str(v), "name": "again"}],
    )
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert [(name, len(part)) for name, part in data.validation.parts()] == [
        ("a", 5), ("v", 7), ("again", 7),
    ]  # fmt: skip
    assert data.validation.parts()[1][1][0] == data.validation[5]
    cfg.data.validation = [{"data_path": str(v), "name": "a"}]
    with pytest.raises(ValueError, match=r"two validation sets are named 'a'.*set `name`"):
        prepare_data(cfg, make_tokenizer("qwen25"))


def test_cache_is_memory_mapped_and_shared(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"data_path": str(_write(tmp_path / "d.jsonl", 50))})
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert isinstance(data.train.ids, np.memmap) and isinstance(data.train.ends, np.memmap)
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    again = prepare_data(cfg, make_tokenizer("qwen25"))
    assert again.report["cache_hit"] == 1 and again.train == data.train
    assert again.train.digest() == data.train.digest()


def test_rows_over_the_character_limit_are_dropped_and_counted(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "d.jsonl", 6)
    with path.open("a") as f:  # one 2,000,000-character row: over the default limit
        f.write(json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000},
                                         {"role": "assistant", "content": "ok"}]}) + "\n")  # fmt: skip
    data = prepare_data(_cfg(tmp_path, {"data_path": str(path)}), make_tokenizer("qwen25"))
    assert data.report["train/dropped_oversize"] == 1 and len(data.train) == 6
    assert "d.jsonl:7" in caplog.text and "data.max_row_chars=1000000" in caplog.text
    mixed = _write(tmp_path / "long.jsonl", 2, extra=40)
    with mixed.open("a") as f:
        f.write(_write(tmp_path / "short.jsonl", 3).read_text())
    small = _cfg(tmp_path, {"data_path": str(mixed)}, max_row_chars=150)
    data = prepare_data(small, make_tokenizer("qwen25"))
    assert data.report["train/dropped_oversize"] == 2 and len(data.train) == 3


def test_deeply_nested_json_is_a_data_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", 2)
    with path.open("a") as f:
        f.write('{"messages": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: nested too deeply"):
        prepare_data(_cfg(tmp_path, {"data_path": str(path)}), make_tokenizer("qwen25"))


def test_validation_loss_per_set_and_token_weighted(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sft.val_batches` applies per set; the combined loss weighs sets by target tokens."""
    from sftkit.config.schema import SFTConfig
    from sftkit.data.loader import BatchPlan
    from sftkit.data.types import ExampleSet
    from sftkit.dist import DistEnv
    from sftkit.train import validation

    lengths = [4, 4, 4, 4, 9, 9, 9]  # set "a": 4 short examples, set "b": 3 long ones
    ids = np.concatenate([np.full(n, 10 if k < 4 else 20, dtype=np.int32)
                          for k, n in enumerate(lengths)])  # fmt: skip
    examples = ExampleSet(
        ids, np.ones(len(ids), dtype=np.uint8), np.cumsum(lengths), np.zeros(7, dtype=np.int32),
        np.zeros(7, dtype=np.uint8), ["t"], [Source("a", 0, 4), Source("b", 4, 7)],
    )  # fmt: skip
    seen = []

    def fake_loss(model, batches, opts, env):
        tokens = sum(b.num_target_tokens for b in batches)
        rows = sum(b.input_ids.shape[0] for b in batches)
        seen.append((rows, tokens))
        return (1.0 if int(batches[0].input_ids.max()) == 10 else 3.0), tokens

    monkeypatch.setattr(validation, "validation_loss", fake_loss)
    sft = SFTConfig(val_batches=1, val_global_batch_size=2, val_micro_batch_size=1)
    metrics = validation.validation_metrics(
        None,
        examples,
        sft,
        BatchPlan(micro_batch_size=1),
        None,
        DistEnv(),  # type: ignore[arg-type]
    )
    (rows_a, tok_a), (rows_b, tok_b) = seen
    assert (rows_a, rows_b) == (2, 2) and tok_b > tok_a  # one batch of 2 from each set
    assert metrics["validation/a/val_loss"] == 1.0 and metrics["validation/b/val_loss"] == 3.0
    expected = (1.0 * tok_a + 3.0 * tok_b) / (tok_a + tok_b)
    assert metrics["validation/val_loss"] == pytest.approx(expected) and expected != 2.0
