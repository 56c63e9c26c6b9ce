"""Benchmarks by NeMo RL's names: local fixtures in each hub schema (offline), the hub call
each makes (`datasets.load_dataset`, monkeypatched), and NeMo RL's prompt processors."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest

from sftkit.data.errors import DataError
from sftkit.eval.benchmarks import (
    BENCHMARKS,
    SIMPLE_EVALS,
    PromptSpec,
    build_items,
    load_source,
    multichoice_prompt,
)
from sftkit.eval.config import EvalConfig, load_eval_config

REPO = Path(__file__).resolve().parents[3]
EVALS = REPO / "examples" / "configs" / "evals"
GPQA_ROW = {"Question": "Which is a noble gas?", "Correct Answer": "Neon",
            "Incorrect Answer 1": "Iron", "Incorrect Answer 2": "Sodium",
            "Incorrect Answer 3": "Carbon", "Subdomain": "Chemistry"}  # fmt: skip
MMLU_ROW = {"": "0", "Question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6",
            "Answer": "B", "Subject": "elementary_mathematics"}  # fmt: skip
# One row per benchmark in the columns its hub copy has (extra columns included).
HUB_ROWS: dict[str, dict[str, Any]] = {
    "AIME2024": {"id": 60, "problem": "Find 1+1.", "solution": "It is 2.", "answer": "2",
                 "url": "https://example.org", "year": "2024"},
    "AIME2025": {"question": "Find 2+3.", "answer": "5"},
    "AIME2026": {"problem_idx": 1, "problem": "Find 3+4.", "answer": 7},  # an int, as on the hub
    "GSM8K": {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"},
    "math500": {"Question": "Simplify $\\frac{2}{4}$.", "Answer": "\\frac{1}{2}"},
    "gpqa_diamond": GPQA_ROW,
    "mmlu": MMLU_ROW,
    "mmlu_ZH-CN": {**MMLU_ROW, "Question": "2+2等于几?"},
    "mmlu_pro": {"question_id": 7, "question": "Pick J.", "options": [str(i) for i in range(10)],
                 "answer": "J", "answer_index": 9, "cot_content": "", "category": "math",
                 "src": "x"},
}  # fmt: skip
# (problem shown, reference) NeMo RL's dataset class makes of each row
EXPECTED = {
    "AIME2024": ("Find 1+1.", "2"),
    "AIME2025": ("Find 2+3.", "5"),
    "AIME2026": ("Find 3+4.", "7"),
    "GSM8K": ("Tom has 2 apples and buys 3. How many?", "5"),
    "math500": ("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}"),
    "mmlu": ("2+2?", "B"),
    "mmlu_ZH-CN": ("2+2等于几?", "B"),
    "mmlu_pro": ("Pick J.", "J"),
}


class ChatML:
    """A tokenizer's chat template (ChatML, as the built-in tiny model's), no vocabulary."""

    bos_token = None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def config(name: str, *overrides: str, file: str = "eval.yaml") -> EvalConfig:
    return load_eval_config(str(EVALS / file), [f"data.dataset_name={name}", *overrides])


def local_copy(tmp_path: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    csv_hub = name.startswith(("math", "mmlu")) and name != "mmlu_pro"  # simple-evals CSVs
    return write_rows(tmp_path / f"{name}.{'csv' if csv_hub else 'jsonl'}", rows)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_reads_a_local_copy_in_its_hub_schema(name: str, tmp_path: Path) -> None:
    path = local_copy(tmp_path, name, [HUB_ROWS[name]])
    source = load_source(config(name, f"data.data_path={path}"))
    items = build_items(source, PromptSpec(None, None, {}), ChatML())
    assert [(i.problem, i.reference) for i in items] == [EXPECTED[name]]
    assert source.name == name and source.processor == BENCHMARKS[name].processor


def test_gpqa_choices_are_shuffled_with_the_seed(tmp_path: Path) -> None:
    rows = [GPQA_ROW, {**GPQA_ROW, "Question": "Another?"}, {**GPQA_ROW, "Question": "Third?"}]
    path = write_rows(tmp_path / "gpqa.jsonl", rows)
    first = load_source(config("gpqa_diamond", f"data.data_path={path}", "eval.seed=7")).rows
    again = load_source(config("gpqa_diamond", f"data.data_path={path}", "eval.seed=7")).rows
    other = load_source(config("gpqa_diamond", f"data.data_path={path}", "eval.seed=8")).rows
    assert first == again and first != other
    rng = random.Random(7)  # NeMo RL's draw: rng.sample(range(4), 4) per row, in order
    answers = ["Neon", "Iron", "Sodium", "Carbon"]
    for row in first:
        order = [answers[i] for i in rng.sample(range(4), 4)]
        assert list(row["options"].values()) == order
        assert row["options"][row["answer"]] == "Neon"


def test_multichoice_prompt_is_nemo_rls_text(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "mmlu.csv", [MMLU_ROW])
    cfg = config("mmlu", f"data.data_path={path}", file="mmlu.yaml")
    spec = PromptSpec("Pick one.", "Be brief.", {})
    [item] = build_items(load_source(cfg), spec, ChatML())
    user = "Pick one.\n\nQuestion: 2+2?\nOptions:\nA) 3\nB) 4\nC) 5\nD) 6"
    # system and user rendered on their own, then joined (NeMo RL's message log)
    assert item.prompt == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{user}"
                           "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    assert multichoice_prompt("P", "Q", {"A": "x", "B": None}) == "P\n\nQuestion: Q\nOptions:\nA) x"
    # without a prompt file the model sees the bare question, as in NeMo RL
    [bare] = build_items(load_source(cfg), PromptSpec(None, None, {}), ChatML())
    assert "Options" not in bare.prompt and "2+2?" in bare.prompt


def test_math_prompt_files_format_the_problem(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "aime.jsonl", [HUB_ROWS["AIME2024"]])
    cfg = config("AIME2024", f"data.data_path={path}", "data.prompt_file=examples/prompts/cot.txt")
    from sftkit.eval.benchmarks import prompt_spec

    [item] = build_items(load_source(cfg), prompt_spec(cfg), ChatML())
    assert "Find 1+1." in item.prompt and "\\boxed{}" in item.prompt
    assert item.prompt.count("<|im_start|>") == 2  # one rendering: user + generation header


def test_processor_rules_follow_nemo_rl(tmp_path: Path) -> None:
    mmlu = write_rows(tmp_path / "mmlu.csv", [MMLU_ROW])
    # mmlu.yaml inherits data.processor=math_hf_data_processor; MMLU keeps its own
    assert config("mmlu", f"data.data_path={mmlu}", file="mmlu.yaml").data.processor
    assert load_source(config("mmlu", f"data.data_path={mmlu}")).processor == (
        "multichoice_qa_processor"
    )
    aime = write_rows(tmp_path / "aime.jsonl", [HUB_ROWS["AIME2024"]])
    with pytest.raises(ValueError, match="rows are messages, which math_hf_data_processor"):
        load_source(
            config("AIME2024", f"data.data_path={aime}", "data.processor=math_data_processor")
        )


def test_missing_hub_column_names_it_and_the_row(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "aime.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(DataError, match=r"aime.jsonl:1: no 'problem' value; AIME2024 rows need"):
        load_source(config("AIME2024", f"data.data_path={path}"))
    path = write_rows(tmp_path / "gsm8k.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(DataError, match=r"gsm8k.jsonl:1: its 'answer' has no '#### <answer>'"):
        load_source(config("GSM8K", f"data.data_path={path}"))


def test_local_data_repeat_and_max_samples(tmp_path: Path) -> None:
    rows = [{"Question": f"{i}+1", "Answer": str(i + 1)} for i in range(5)]
    path = write_rows(tmp_path / "local.csv", rows)
    cfg = config(str(path), "data.max_samples=2", "data.repeat=3", file="local_eval.yaml")
    source = load_source(cfg)
    assert source.processor == "math_data_processor" and len(source.rows) == 6
    assert [r["expected_answer"] for r in source.rows] == ["1", "2"] * 3
    with pytest.raises(ValueError, match="neither a benchmark nor a file. Benchmarks: AIME2024"):
        load_source(config("MATH-500"))


# -- the hub: each benchmark's load_dataset call, as NeMo RL makes it ------------------------
HUB_CALLS: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "AIME2024": [(("HuggingFaceH4/aime_2024",), {"split": "train"})],
    "AIME2025": [(("opencompass/AIME2025", "AIME2025-I"), {"split": "test"}),
                 (("opencompass/AIME2025", "AIME2025-II"), {"split": "test"})],
    "AIME2026": [(("MathArena/aime_2026",), {"split": "train"})],
    "GSM8K": [(("openai/gsm8k", "main"), {"split": "test"})],
    "math": [(("csv",), {"data_files": f"{SIMPLE_EVALS}/math_test.csv", "split": "train"})],
    "math500": [(("csv",), {"data_files": f"{SIMPLE_EVALS}/math_500_test.csv", "split": "train"})],
    "gpqa": [(("Idavidrein/gpqa", "gpqa_main"), {"split": "train"})],
    "gpqa_diamond": [(("Idavidrein/gpqa", "gpqa_diamond"), {"split": "train"})],
    "mmlu": [(("csv",), {"data_files": f"{SIMPLE_EVALS}/mmlu.csv", "split": "train"})],
    "mmlu_ZH-CN": [(("csv",), {"data_files": f"{SIMPLE_EVALS}/mmlu_ZH-CN.csv", "split": "train"})],
    "mmlu_pro": [(("TIGER-Lab/MMLU-Pro",), {"split": "test"})],
}  # fmt: skip


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    import datasets

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append((args, kwargs))
        name = next((n for n, c in HUB_CALLS.items() if (args, kwargs) in c), "")
        base = {"math": "math500", "gpqa": "gpqa_diamond"}.get(name, name)
        return [HUB_ROWS.get(base, {"Question": "q", "Answer": "a"})]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", sorted(HUB_CALLS))
def test_hub_loader_is_called_as_nemo_rl_calls_it(name: str, hub: list) -> None:
    source = load_source(config(name))
    assert hub == HUB_CALLS[name]
    assert len(source.rows) == len(HUB_CALLS[name])


def test_local_eval_url_and_hub_failure(hub: list, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_eval_config(str(EVALS / "local_eval.yaml"), ["data.problem_key=Question"])
    load_source(cfg)
    url = f"{SIMPLE_EVALS}/math_500_test.csv"
    assert hub == [(("csv",), {"data_files": url, "split": "train"})]

    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/aime_2024' on the Hub\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError) as info:
        load_source(config("AIME2024"))
    assert "\n" not in str(info.value) and "set data.data_path to a local copy" in str(info.value)
    assert "(problem, answer)" in str(info.value)


# -- end to end on the tiny model: each shipped config on a local copy of its benchmark -----
CONFIG_BENCHMARK = {"eval.yaml": "AIME2024", "math_eval.yaml": "math", "gpqa_eval.yaml": "gpqa",
                    "local_eval.yaml": "", "mmlu.yaml": "mmlu", "mmlu_pro.yaml": "mmlu_pro",
                    "mmlu_zh_cn.yaml": "mmlu_ZH-CN"}  # fmt: skip


@pytest.mark.parametrize("file", sorted(CONFIG_BENCHMARK))
def test_each_shipped_config_runs_offline(file: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    from sftkit.eval.run import evaluate

    name = CONFIG_BENCHMARK[file]
    row = HUB_ROWS[{"math": "math500", "gpqa": "gpqa_diamond"}.get(name, name or "math500")]
    path = local_copy(tmp_path, name or "math500", [row, row])
    # local_eval.yaml reads a file named in dataset_name; the others keep the benchmark's name
    data = f"data.dataset_name={path}" if not name else f"data.data_path={path}"
    cfg = load_eval_config(str(EVALS / file), [data, f"generation.model_name={tiny_model_dir}",
                           "generation.max_new_tokens=2", "generation.device=cpu"])  # fmt: skip
    result = evaluate(cfg)
    assert result["dataset"] == (name or str(path)) and result["num_samples"] == 2
    assert result["verifier"] == (cfg.env.math.verifier_type or "math")
    assert len(result["generations"]) == 2 and 0.0 <= result["score"] <= 1.0
