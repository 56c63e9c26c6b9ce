"""A NeMo RL user's data code and configs load unchanged (issue 23, item 4), and NeMo RL's
newer math datasets load under its registry names from local files in their hub schema."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, make_tokenizer, trained_runs

from sftkit.config import MasterConfig
from sftkit.config.checks import ignored_settings
from sftkit.data.datasets import files, gsm8k, load_dataset, rows_of
from sftkit.data.datasets.files import Rows
from sftkit.data.messages import normalize_conversation
from sftkit.data.processor import Processor, ProcessorSettings
from sftkit.data.tokenizer import PASSTHROUGH_TEMPLATE

DATA = FIXTURES / "data"


@pytest.mark.parametrize(
    "roles", [["assistant"], ["assistant", "user", "assistant"]], ids=["a", "a-u-a"]
)
def test_passthrough_template_trains_leading_assistant(roles: list[str]) -> None:
    tok = make_tokenizer("qwen25")
    tok.chat_template = PASSTHROUGH_TEMPLATE
    texts = ["Hello there", "Thanks", "Bye."]
    row = {"messages": [{"role": r, "content": t} for r, t in zip(roles, texts, strict=False)]}
    proc = Processor(tok, ProcessorSettings(max_length=512, add_bos=False, add_eos=True))
    ids, mask, text = proc.encode(row)
    assert text == "".join(texts[: len(roles)])
    replies = [t for r, t in zip(roles, texts, strict=False) if r == "assistant"]
    runs = [tok.decode(r) for r in trained_runs(ids, mask)]
    assert runs == [*replies[:-1], replies[-1] + "<|im_end|>"]


def test_null_subset_and_split_take_the_class_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_hub(name: str, split: str | None = None, subset: str | None = None) -> Rows:
        seen.update(name=name, split=split, subset=subset)
        return files.read_rows(str(DATA / "gsm8k.jsonl"))

    monkeypatch.setattr(gsm8k, "read_hub", fake_hub)
    load_dataset({"dataset_name": "GSM8K", "subset": None, "split": None, "seed": None})
    assert seen == {"name": "openai/gsm8k", "split": "train", "subset": "main"}


NEMO_STYLE = '''
class NemoStyleDataset:
    """NeMo RL's current protocol: rows in .dataset, set_task_spec, whole entry as kwargs."""

    def __init__(self, data_path, dataset_name=None, processor=None, **kwargs):
        import json
        assert dataset_name == "nemo_user_data.NemoStyleDataset" and processor == "sft_processor"
        self.task_name = "mine"
        with open(data_path) as f:
            self.dataset = [json.loads(line) for line in f]
        self.val_dataset = self.dataset[:1]

    def set_task_spec(self, data_config):
        class Spec:  # NeMo RL's TaskDataSpec stand-in: no `apply`
            task_name = self.task_name
        self.data_config = data_config
        self.task_spec = Spec()

    def set_processor(self):
        self.processor = "sft_processor"


class Swallower:
    def __init__(self, **kwargs):
        self.formatted_ds = {"train": [{"messages": []}], "validation": None}
        from sftkit.data.datasets import TaskDataSpec
        self.task_spec = TaskDataSpec("swallow")


NOT_A_CLASS = 42
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "nemo_user_data.py").write_text(NEMO_STYLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "nemo_user_data"
    sys.modules.pop("nemo_user_data", None)


def test_nemo_rl_protocol_class_loads_by_dotted_path(user_module: str, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Q: {}")
    entry = {
        "dataset_name": f"{user_module}.NemoStyleDataset",
        "data_path": str(DATA / "response.jsonl"),
        "processor": "sft_processor",
        "prompt_file": str(prompt),
    }
    dataset = load_dataset(entry)
    assert dataset.task_spec.task_name == "mine"
    train = rows_of(dataset, "train")
    assert len(train) == len((DATA / "response.jsonl").read_text().splitlines())
    assert len(rows_of(dataset, "validation")) == 1
    assert (
        dataset.task_spec.apply({"messages": [{"role": "user", "content": "x"}]})["messages"][0][
            "content"
        ]
        == "Q: x"
    )


def test_kwargs_class_reports_each_swallowed_key(
    user_module: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = {"dataset_name": f"{user_module}.Swallower", "subset": "main", "seed": 7,
             "split_validation_size": 0.1, "data_path": "x.jsonl", "input_key": "q"}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        load_dataset(entry)
    message = " ".join(r.getMessage() for r in caplog.records)
    for shown in ("subset='main'", "seed=7", "split_validation_size=0.1",
                  "data_path='x.jsonl'", "input_key='q'"):  # fmt: skip
        assert shown in message


def test_dotted_name_of_a_non_class_is_one_line(user_module: str) -> None:
    with pytest.raises(ValueError, match=r"names a int \(42\), not a dataset class"):
        load_dataset({"dataset_name": f"{user_module}.NOT_A_CLASS"})


def test_microbatch_order_largest_first_is_reported() -> None:
    cfg = MasterConfig()
    assert "policy.sequence_packing.microbatch_order" not in ignored_settings(cfg)
    cfg.policy.sequence_packing.microbatch_order = "largest_first"
    assert "policy.sequence_packing.microbatch_order" in ignored_settings(cfg)


# -- NeMo RL's newer math datasets ------------------------------------------------------------
MATH = {
    "NuminaMath-1.5": ("numinamath15.jsonl", [("What is 6 times 7?", "42")]),
    "OpenR1-Math-220k": (
        "openr1_math.jsonl",
        [("What is 12 + 30?", "42"), ("What is 2 * 21?", "42")],
    ),
    "DAPOMath17K": ("dapo_math17k.jsonl", [("Solve: 6 * 7 = ?", "42"), ("Solve: 1 + 1 = ?", "2")]),
    "DeepScaler": ("deepscaler.jsonl", [("What is 6 * 7?", "42"), ("What is 3 + 4?", "7")]),
}


@pytest.mark.parametrize("name", sorted(MATH))
def test_math_datasets_by_registry_name(name: str) -> None:
    file, expected = MATH[name]
    dataset = load_dataset({"dataset_name": name, "data_path": str(DATA / file)})
    assert dataset.task_spec.task_name == name
    rows = rows_of(dataset, "train")
    got = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    assert got == expected
    for row in rows:
        normalize_conversation(row, row["_origin"])


def test_numinamath_keeps_unverified_rows_when_asked() -> None:
    entry = {"dataset_name": "NuminaMath-1.5", "data_path": str(DATA / "numinamath15.jsonl")}
    loose = load_dataset({**entry, "verifiable_only": False, "require_valid": False})
    assert len(rows_of(loose, "train")) == 5
    valid_only = load_dataset({**entry, "verifiable_only": False})
    assert len(rows_of(valid_only, "train")) == 4


def test_nemotron_cascade_math_native_messages() -> None:
    entry = {"dataset_name": "Nemotron-Cascade-2-SFT-Math",
             "data_path": str(DATA / "nemotron_cascade2_math.jsonl")}  # fmt: skip
    dataset = load_dataset({**entry, "split_validation_size": 1})
    train, validation = rows_of(dataset, "train"), rows_of(dataset, "validation")
    assert (len(train), len(validation)) == (2, 1)
    assert all(r["messages"][-1]["role"] == "assistant" for r in train + validation)
    sampled = load_dataset({**entry, "max_samples": 2, "split_validation_size": 0})
    assert len(rows_of(sampled, "train")) == 2
