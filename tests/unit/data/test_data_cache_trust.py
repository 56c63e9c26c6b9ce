"""The prepared-data cache is checked before it is trusted: checksums and bounds once per
node, sizes on every open, damaged entries rebuilt with a warning naming them, abandoned
temp entries removed (never a live build's), and `data.cache_dir` checked before hashing."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tokenizer

from sftkit.config.derive import derive_config
from sftkit.config.schema import MasterConfig
from sftkit.data import cache, prepare_data
from sftkit.data import prepare as prepare_module


def _cfg(tmp_path: Path, n: int = 12) -> MasterConfig:
    path = tmp_path / "d.jsonl"
    with path.open("w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"What is {i} + 30?"},
                {"role": "assistant", "content": f"It is {i + 30}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    cfg = MasterConfig()
    cfg.data.train = {"dataset_name": "openai_format", "data_path": str(path)}
    cfg.data.cache_dir = str(tmp_path / "cache")
    return derive_config(cfg)  # derived as load_config does


def _entry(tmp_path: Path) -> Path:
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name[0] != "."]
    return entry


def _rewrite(path: Path, array: np.ndarray, *, fix_checksum: bool = False) -> None:
    """Rewrite an array file; with `fix_checksum` also its sha256 (a bug, not corruption)."""
    array.tofile(path)
    if fix_checksum:
        import hashlib

        meta_path = path.parent / "meta.json"
        meta = json.loads(meta_path.read_text())
        split, name, _ = path.name.split(".")
        meta[split]["sha256"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
        meta_path.write_text(json.dumps(meta))


def _damage(entry: Path, how: str) -> None:
    ids = np.fromfile(entry / "train.ids.bin", dtype=np.int32)
    mask = np.fromfile(entry / "train.mask.bin", dtype=np.uint8)
    n_examples = len(np.fromfile(entry / "train.ends.bin", dtype=np.int64))
    if how == "ids rewritten":  # in the vocabulary: only the checksum sees it
        _rewrite(entry / "train.ids.bin", (ids + 1) % 200)
    elif how == "mask all ones":
        _rewrite(entry / "train.mask.bin", np.ones_like(mask))
    elif how == "ids beyond vocab":
        _rewrite(entry / "train.ids.bin", ids + 10**6, fix_checksum=True)
    elif how == "offsets beyond tokens":
        _rewrite(entry / "train.ends.bin", np.arange(n_examples) * 10**6 + 1, fix_checksum=True)
    elif how == "task index beyond names":
        _rewrite(entry / "train.task.bin", np.full(n_examples, 7, np.int32), fix_checksum=True)
    elif how == "truncated token file":
        (entry / "train.ids.bin").write_bytes((entry / "train.ids.bin").read_bytes()[:-40])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("ids rewritten", "train.ids.bin does not match its checksum"),
        ("mask all ones", "train.mask.bin does not match its checksum"),
        ("ids beyond vocab", "outside the tokenizer's vocabulary"),
        ("offsets beyond tokens", "train.ends.bin holds example offsets"),
        ("task index beyond names", "train.task.bin holds task indexes"),
        ("truncated token file", "train.ids.bin has"),
    ],
)
def test_a_damaged_entry_is_rebuilt_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, named: str
) -> None:
    cfg, tokenizer = _cfg(tmp_path), make_tokenizer("qwen25")
    first = prepare_data(cfg, tokenizer)
    expected = ([e.input_ids for e in first.train], first.report["train/trained_tokens"])
    entry = _entry(tmp_path)
    _damage(entry, how)
    with caplog.at_level("WARNING", logger="sftkit"):
        again = prepare_data(cfg, tokenizer)
    [warning] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(entry) in warning and named in warning and "rebuilding" in warning
    assert again.report["cache_hit"] == 0
    assert ([e.input_ids for e in again.train], int(again.train.mask.sum())) == expected
    assert prepare_data(cfg, tokenizer).report["cache_hit"] == 1  # the rebuilt entry holds


def test_checksums_are_verified_once_per_node_not_on_every_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = cache._checksum_problem
    monkeypatch.setattr(
        cache, "_checksum_problem", lambda d, s, i, *bar: calls.append(s) or real(d, s, i, *bar)
    )
    cfg, tokenizer = _cfg(tmp_path), make_tokenizer("qwen25")
    prepare_data(cfg, tokenizer)  # the builder checks what it wrote
    assert calls == ["train", "validation"]
    for _ in range(3):
        assert prepare_data(cfg, tokenizer).report["cache_hit"] == 1
    assert calls == ["train", "validation"]  # later opens: sizes and the node's record only
    assert (_entry(tmp_path) / f"verified.{socket.gethostname()}.json").is_file()


def test_cache_dir_that_is_a_file_fails_before_hashing_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path)
    cfg.data.cache_dir = str(tmp_path / "a_file")  # a derived config: set after deriving
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(prepare_module, "_key", lambda *a: pytest.fail("hashed first"))
    with pytest.raises(ValueError, match=r"data.cache_dir=.*a_file.* is a file, not a directory"):
        prepare_data(cfg, make_tokenizer("qwen25"))


def test_abandoned_temp_entries_go_and_live_builds_stay(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    host = socket.gethostname()
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # never a live pid
    killed = root / f".k1.{dead}.{host}.ab_c.tmp"  # this host, pid gone
    live = root / f".k2.{os.getpid()}.{host}.x1.tmp"  # a concurrent build of this host
    elsewhere = root / ".k3.123.other-node.example.q.tmp"  # another host's, recent
    old = root / ".k4.123.other-node.example.z.tmp"  # another host's, idle for days
    for d in (killed, live, elsewhere, old):
        d.mkdir()
        (d / "train.ids.bin").write_bytes(b"1234")
    week_ago = time.time() - 7 * 24 * 3600
    for p in (old / "train.ids.bin", old):
        os.utime(p, (week_ago, week_ago))
    removed = cache.remove_abandoned(root)
    assert sorted(removed) == sorted([killed, old])
    assert live.is_dir() and elsewhere.is_dir()
