"""Seed-guide dataset forms and user mistakes: each works as written or fails in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sftkit.data.datasets import load_dataset
from sftkit.data.errors import DataError
from sftkit.eval.benchmarks import load_source
from sftkit.eval.config import QUICKSTART_EVAL_CONFIG, load_eval_config
from sftkit.eval.run import pass_at_k, score_prompt

# The `data.default` block of the seed guide, verbatim.
GUIDE_DEFAULT = {
    "dataset_name": "ResponseDataset",
    "input_key": "input",
    "output_key": "output",
    "prompt_file": None,
    "system_prompt_file": None,
    "processor": "sft_processor",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int) -> list[dict]:
    return [{"question": f"{i}+1", "output": str(i + 1)} for i in range(n)]


def test_guide_default_block_is_silent_for_openai_format(tmp_path: Path, caplog) -> None:
    """`data.default` reaches every entry; its ResponseDataset keys are no noise elsewhere."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        ds = load_dataset({**GUIDE_DEFAULT, "dataset_name": "openai_format", "data_path": path})
        load_dataset({**GUIDE_DEFAULT, "dataset_name": "openai_format", "data_path": path,
                      "input_key": "question"})  # fmt: skip
    assert ds.formatted_ds["train"][0]["messages"] == chat
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "input_key" in warnings[0] and "output_key" not in warnings[0]


def test_misspelt_dataset_key_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(4))
    with pytest.raises(ValueError, match="unknown key 'input_kye'. Did you mean 'input_key'"):
        load_dataset({**GUIDE_DEFAULT, "data_path": str(path), "input_kye": "question"})
    # a NeMo RL key another dataset takes stays a warning, never a typo error
    ds = load_dataset({**GUIDE_DEFAULT, "data_path": str(path), "input_key": "question",
                       "chat_key": "messages"})  # fmt: skip
    assert ds.formatted_ds["train"][0]["messages"][0]["content"] == "0+1"


def test_unknown_processor_is_reported(tmp_path: Path, caplog) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(2))
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        load_dataset({**GUIDE_DEFAULT, "data_path": str(path), "input_key": "question",
                      "processor": "math_data_processor"})  # fmt: skip
    assert any("math_data_processor" in r.getMessage() for r in caplog.records)


def test_dataset_directories_with_split(tmp_path: Path, monkeypatch) -> None:
    """save_to_disk DatasetDicts and hub-clone directories of data files, picked by `split`."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = qa_rows(6)
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "clone" / "data").mkdir(parents=True)
    dd["train"].to_parquet(str(tmp_path / "clone" / "data" / "train-00000-of-00001.parquet"))
    dd["test"].to_parquet(str(tmp_path / "clone" / "data" / "test-00000-of-00001.parquet"))
    for name in ("saved", "clone"):
        entry = {**GUIDE_DEFAULT, "data_path": str(tmp_path / name), "input_key": "question"}
        assert len(load_dataset({**entry, "split": "train"}).formatted_ds["train"]) == 6
        test = load_dataset({**entry, "split": "test"}).formatted_ds["train"]
        assert [r["messages"][1]["content"] for r in test] == ["1", "2"]
    with pytest.raises(DataError, match="has no split 'validation'.*set split"):
        load_dataset({**GUIDE_DEFAULT, "data_path": str(tmp_path / "saved"), "split": "validation"})


def test_unreachable_hub_id_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'hf_org/hf_dataset_name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hf_org/hf_dataset_name: could not load it from the"):
        load_dataset({**GUIDE_DEFAULT, "data_path": "hf_org/hf_dataset_name", "split": "train"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="could not load it as a data directory"):
        load_dataset({**GUIDE_DEFAULT, "data_path": str(tmp_path / "empty")})


def test_eval_config_accepts_nemo_keys_and_names_typos(tmp_path: Path) -> None:
    cfg = load_eval_config(None, ["generation.temperature=0.6", "generation.top_p=0.95",
                                  "eval.num_tests_per_prompt=4", "eval.metric=pass@k",
                                  "eval.k_value=2", "cluster.gpus_per_node=8",
                                  "generation.vllm_cfg.max_model_len=32768"])  # fmt: skip
    assert cfg.generation.temperature == 0.6 and cfg.eval.k_value == 2
    with pytest.raises(ValueError, match="'generation.max_new_token'. Did you mean 'generation"):
        load_eval_config(None, ["generation.max_new_token=3"])
    with pytest.raises(ValueError, match="k_value=5 must be between 1 and"):
        load_eval_config(None, ["eval.k_value=5"])
    with pytest.raises(ValueError, match=r"generation.max_new_tokens: Value 'x'"):
        load_eval_config(None, ["generation.max_new_tokens=x"])
    # NeMo RL's benchmark names are accepted (issue 27; they used to be refused)
    assert load_eval_config(None, ["data.dataset_name=math500"]).data.dataset_name == "math500"


def test_eval_rows_and_scores(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", [{"q": "1+1", "a": 2}, {"q": "2+2", "a": 4}])
    cfg = load_eval_config(str(QUICKSTART_EVAL_CONFIG), [f"data.data_path={path}",
                           "data.problem_key=q", "data.solution_key=a"])  # fmt: skip
    rows = load_source(cfg).rows
    assert [r["messages"][0]["content"] for r in rows] == ["1+1", "2+2"]
    cfg.data.solution_key = "answer"
    with pytest.raises(DataError, match=r"eval.jsonl:1: no 'answer' value.*solution_key"):
        load_source(cfg)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert score_prompt([" 2", "3", "2", "2"], "2", "pass@k", 1) == (0.75, True)
    assert score_prompt(["3", "2", "2"], "2", "cons@k", 3) == (1.0, False)
    assert score_prompt(["sum is 2"], "2", "contains", 1) == (1.0, True)
    assert score_prompt(["sum is 2"], "2", "exact_match", 1) == (0.0, False)
