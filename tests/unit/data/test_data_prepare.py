"""prepare_data: config forms, validation union, length policy, cache, workers, EOS/BOS."""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import sys
import threading
from pathlib import Path

import pytest
from conftest import FIXTURES, make_tokenizer

from sftkit.config.derive import derive_config
from sftkit.config.schema import MasterConfig
from sftkit.data import DataError, prepare_data
from sftkit.data.tokenizer import PASSTHROUGH_TEMPLATE

DATA = FIXTURES / "data"


def _write(path: Path, n: int, long_every: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(n):
            answer = "The answer is 42. " * (60 if long_every and i % long_every == 0 else 1)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} + 30?"},
                            {"role": "assistant", "content": answer.strip()},
                        ]
                    }
                )
                + "\n"
            )
    return path


def _cfg(tmp_path: Path, train, **data) -> MasterConfig:
    cfg = MasterConfig()
    cfg.data.train = train
    cfg.data.cache_dir = str(tmp_path / "cache")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return derive_config(cfg)  # derived and checked as load_config does


def test_validation_is_split_off_plus_validation_datasets_with_defaults(tmp_path: Path):
    cfg = _cfg(
        tmp_path,
        [{"data_path": str(_write(tmp_path / "a.jsonl", 20)), "split_validation_size": 5}],
        validation={"data_path": str(DATA / "response.jsonl")},
        default={
            "dataset_name": "ResponseDataset",
            "input_key": "question",
            "output_key": "answer",
        },
    )
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert data.report["train/examples"] == 15
    assert data.report["validation/examples"] == 5 + 4
    assert {e.task_name for e in data.validation} == {
        "tmp/a.jsonl".replace("tmp", tmp_path.name),
        "data/response.jsonl",
    }


def test_flat_form_of_the_seed(tmp_path: Path):
    cfg = _cfg(
        tmp_path,
        None,
        dataset_name="openai_format",
        extra={"data_path": str(DATA / "tools_heterogeneous.jsonl")},
    )
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert data.report["train/examples"] == 2 and not data.validation


@pytest.mark.parametrize(
    ("policy", "kept", "key"),
    [
        ("truncate", 10, "train/truncated"),
        ("drop", 8, "train/dropped_overlong"),
        ("mask", 10, "train/masked_overlong"),
    ],
)
def test_overlong_policy_is_counted(tmp_path: Path, policy: str, kept: int, key: str):
    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(_write(tmp_path / "d.jsonl", 10, 5))},
        overlong_policy=policy,
        max_input_seq_length=120,
    )
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert len(data.train) == kept and data.report[key] == 2
    assert all(len(e.input_ids) <= 120 and len(e.loss_mask) == len(e.input_ids) for e in data.train)
    zero = [e for e in data.train if not any(e.loss_mask)]
    assert len(zero) == (2 if policy == "mask" else 0)


def test_untrainable_is_an_error_or_a_counted_drop(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    with path.open("w") as f:
        for i in range(4):  # rows 0 and 2 have prompts longer than the limit
            prompt = "What is the capital of France? " * (20 if i % 2 == 0 else 1)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": prompt},
                            {"role": "assistant", "content": "Paris."},
                        ]
                    }
                )
                + "\n"
            )
    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(path)},
        max_input_seq_length=100,
    )
    with pytest.raises(
        DataError, match=r"d.jsonl:1: no token is trained after truncation.*prompt alone.*drop"
    ):
        prepare_data(cfg, make_tokenizer("qwen25"))
    cfg.data.drop_untrainable = True
    data = prepare_data(cfg, make_tokenizer("qwen25"))
    assert data.report["train/dropped_untrainable"] == 2 and len(data.train) == 2


def test_cache_hits_and_is_invalidated_by_tokenizer_and_template(tmp_path: Path):
    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(_write(tmp_path / "d.jsonl", 30))},
    )
    first = prepare_data(cfg, make_tokenizer("qwen25"))
    again = prepare_data(cfg, make_tokenizer("qwen25"))
    assert (first.report["cache_hit"], again.report["cache_hit"]) == (0, 1)
    assert [e.input_ids for e in again.train] == [e.input_ids for e in first.train]
    assert [e.loss_mask for e in again.train] == [e.loss_mask for e in first.train]
    other_template = make_tokenizer("qwen3")
    assert prepare_data(cfg, other_template).report["cache_hit"] == 0
    other_vocab = make_tokenizer("qwen25", "metaspace")
    assert prepare_data(cfg, other_vocab).report["cache_hit"] == 0
    cfg.data.max_input_seq_length = 500
    assert prepare_data(cfg, make_tokenizer("qwen25")).report["cache_hit"] == 0


def test_workers_give_identical_results(tmp_path: Path):
    path = _write(tmp_path / "d.jsonl", 300)
    one = prepare_data(
        _cfg(
            tmp_path / "1", {"dataset_name": "openai_format", "data_path": str(path)}, num_workers=1
        ),
        make_tokenizer("qwen25"),
    )
    two = prepare_data(
        _cfg(
            tmp_path / "2", {"dataset_name": "openai_format", "data_path": str(path)}, num_workers=2
        ),
        make_tokenizer("qwen25"),
    )
    assert two.report["cache_hit"] == 0
    # every row took the single render and the byte-length table (ASCII, byte-level BPE)
    assert two.report["train/span_fallbacks"] == two.report["train/offset_fallbacks"] == 0
    assert [(e.input_ids, e.loss_mask) for e in one.train] == [
        (e.input_ids, e.loss_mask) for e in two.train
    ]


def test_passthrough_trains_assistant_contents_and_appended_eos(tmp_path: Path):
    tok = make_tokenizer("none")  # eos <|endoftext|>, no BOS
    tok.chat_template = PASSTHROUGH_TEMPLATE
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Question: What is 12 + 30? Answer:"},
                    {"role": "assistant", "content": " 42"},
                ]
            }
        )
        + "\n"
    )
    cfg = _cfg(tmp_path, {"dataset_name": "openai_format", "data_path": str(path)})
    (example,) = prepare_data(cfg, tok).train
    assert example.input_ids[-1] == tok.eos_token_id and example.loss_mask[-1] == 1
    trained = [i for i, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    assert tok.decode(trained) == " 42<|endoftext|>"


def test_bos_added_where_the_template_lacks_it(tmp_path: Path):
    tok = make_tokenizer("qwen25")
    tok.bos_token = "<|begin_of_text|>"
    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(_write(tmp_path / "d.jsonl", 2))},
    )
    example = prepare_data(cfg, tok).train[0]
    assert example.input_ids[0] == tok.bos_token_id and example.loss_mask[0] == 0
    assert example.input_ids.count(tok.bos_token_id) == 1


def test_truncation_over_one_percent_warns_with_a_length_that_fits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """2 of 10 rows cut: a warning with the count and the length that fits >= 99% of rows."""
    path = _write(tmp_path / "d.jsonl", 10, 5)
    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(path)},
        max_input_seq_length=120,
    )
    tokenizer = make_tokenizer("qwen25")
    with caplog.at_level("WARNING", logger="sftkit"):
        data = prepare_data(cfg, tokenizer)
    [warning] = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    fit = data.report["train/length_p99"]
    assert "train: 2 of 10 rows (20.0%) are longer than 120 tokens and were truncated" in warning
    assert f"max_total_sequence_length={fit} would fit" in warning
    # The smallest such length: one token less cuts the 2 long rows again.
    with caplog.at_level("WARNING", logger="sftkit"):
        prepare_data(_cfg(tmp_path, cfg.data.train, max_input_seq_length=fit - 1), tokenizer)
    assert [r for r in caplog.records if "longer than" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sftkit"):  # all fit: silent
        prepare_data(_cfg(tmp_path, cfg.data.train, max_input_seq_length=fit), tokenizer)
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]


def test_split_validation_size_as_percent_is_one_line_naming_the_key(tmp_path: Path):
    path = _write(tmp_path / "d.jsonl", 10)
    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(path), "split_validation_size": "5%"},
    )
    with pytest.raises(ValueError, match=r"split_validation_size='5%'.*0\.05") as err:
        prepare_data(cfg, make_tokenizer("qwen25"))
    assert "\n" not in str(err.value)


def test_flat_train_data_path_is_one_line_naming_the_key(tmp_path: Path):
    path = _write(tmp_path / "d.jsonl", 10)
    cfg = _cfg(tmp_path, None, dataset_name="ResponseDataset", extra={"train_data_path": str(path)})
    with pytest.raises(
        ValueError, match=r"needs data_path.*train_data_path.*data\.train\.data_path"
    ):
        prepare_data(cfg, make_tokenizer("qwen25"))


def test_prompt_file_without_placeholder_names_the_file(tmp_path: Path):
    from sftkit.data.datasets.base import TaskDataSpec

    (tmp_path / "p.txt").write_text("Answer the question.")
    with pytest.raises(ValueError, match=r"prompt_file .*p\.txt has no \{\} placeholder"):
        TaskDataSpec("x", prompt_file=str(tmp_path / "p.txt"))
    (tmp_path / "q.txt").write_text("Question: {question}")
    with pytest.raises(ValueError, match=r"q\.txt has no \{\} placeholder.*found \{question\}"):
        TaskDataSpec("x", prompt_file=str(tmp_path / "q.txt"))
    (tmp_path / "ok.txt").write_text("Q ({{literal}}): {}")
    assert TaskDataSpec("x", prompt_file=str(tmp_path / "ok.txt")).prompt == "Q ({{literal}}): {}"


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_forked_workers_leave_the_run_s_signal_handler_so_terminate_ends_them() -> None:
    """A worker that kept the run's flag-only SIGTERM handler outlived `Pool.terminate`: the
    run hung after tokenizing (seen in bench/data_scale.py with a 10 MB row)."""
    from sftkit.data.prepare import _init_worker
    from sftkit.data.processor import ProcessorSettings
    from sftkit.lifecycle.signals import StopFlag

    stop = StopFlag()  # what run_sft installs before preparing data
    stop.install()
    try:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        pool = mp.get_context("fork").Pool(
            2,
            initializer=_init_worker,
            initargs=(make_tokenizer(), ProcessorSettings(max_length=64)),
        )
        dispositions = {
            pool.apply(signal.getsignal, (s,)) for s in (signal.SIGTERM, signal.SIGUSR1)
        }
        assert dispositions == {signal.SIG_DFL}
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
        ender = threading.Thread(target=pool.terminate, daemon=True)
        ender.start()
        ender.join(timeout=30)
        assert not ender.is_alive(), "Pool.terminate hung on a worker"
    finally:
        stop.restore()


def test_data_report_is_one_readable_line(tmp_path: Path, caplog) -> None:
    import logging

    from sftkit.data.prepare import COUNTER_NAMES

    cfg = _cfg(
        tmp_path,
        {"dataset_name": "openai_format", "data_path": str(_write(tmp_path / "d.jsonl", 10, 5))},
        max_input_seq_length=120,
    )
    with caplog.at_level(logging.INFO, logger="sftkit"):
        prepare_data(cfg, make_tokenizer("qwen25"))
    lines = [r.getMessage() for r in caplog.records if "examples of" in r.getMessage()]
    assert len(lines) == 1, lines  # printed once
    assert "train 10 examples of 10 rows" in lines[0]
    assert "2 truncated to the length limit" in lines[0]  # non-zero counters, named
    assert "dropped as too long" not in lines[0] and "=0" not in lines[0]  # zeros left out
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert all(name in readme for name in COUNTER_NAMES.values())  # each one explained


def test_hashing_tokenizing_and_checking_report_progress(tmp_path: Path, caplog, monkeypatch):
    """Each long pass logs progress lines (a quarter at a time here) and a closing line."""
    import functools
    import logging

    from sftkit.data import cache
    from sftkit.data import prepare as prepare_module
    from sftkit.log.progress import Progress

    fast = functools.partial(Progress, step_fraction=0.25, every_s=0.0, bar=False)
    monkeypatch.setattr(prepare_module, "Progress", fast)
    monkeypatch.setattr(cache, "Progress", fast)
    data = {"dataset_name": "openai_format", "data_path": str(_write(tmp_path / "d.jsonl", 64))}
    with caplog.at_level(logging.INFO, logger="sftkit"):
        prepare_data(_cfg(tmp_path, data), make_tokenizer("qwen25"))
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("hashing the data: 64 rows | ") for line in lines), lines
    tokenizing = [line for line in lines if line.startswith("tokenizing and writing")]
    assert "tokenizing and writing the data cache: 25% (16 rows/64 rows)" in tokenizing[0]
    assert (
        "eta" in tokenizing[0]
        and tokenizing[-1].endswith("s")
        and "done, 64 rows" in tokenizing[-1]
    )
    assert any(line.startswith("checking the data cache: done") for line in lines), lines
