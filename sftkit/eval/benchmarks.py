"""Benchmarks by NeMo RL's names, read as NeMo RL reads them, and its prompt processors.

`data.dataset_name` names a benchmark of `BENCHMARKS` (NeMo RL's names at 7ea279ab: its
response-dataset registry for AIME and GSM8K, `load_eval_dataset` for the rest); its rows
come from the hub through `datasets.load_dataset` with NeMo RL's arguments, or offline from
`data.data_path`, a local copy in the hub's columns. Any other `dataset_name` is a local
file or URL with `problem_key` / `solution_key` columns (NeMo RL's `LocalMathDataset`);
`data.data_path` alone is sftkit's local data (rendered as training renders it).

Each row is rekeyed as NeMo RL's dataset class does, then a processor (NeMo RL's
`math_hf_data_processor`, `math_data_processor` or `multichoice_qa_processor`, the same
prompt text) makes the chat-templated prompt and the reference answer.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftkit.data.errors import DataError

if TYPE_CHECKING:
    from sftkit.eval.config import EvalConfig, EvalDataSection

logger = logging.getLogger("sftkit")

Row = dict[str, Any]
SIMPLE_EVALS = "https://openaipublic.blob.core.windows.net/simple-evals"
# MMMLU's languages (NeMo RL's `MMLUDataset`): `mmlu_<LANG>`; `mmlu` is English.
MMLU_LANGUAGES = (
    "AR-XY", "BN-BD", "DE-DE", "ES-LA", "FR-FR", "HI-IN", "ID-ID", "IT-IT", "JA-JP", "KO-KR",
    "PT-BR", "ZH-CN", "SW-KE", "YO-NG",
)  # fmt: skip


@dataclass(frozen=True)
class EvalItem:
    """One prompt to generate for: what the model sees, what it is scored against."""

    problem: str  # the question as the dataset gives it (for the saved generations)
    prompt: str  # chat-templated text ending in the generation header
    reference: str  # the ground truth (a letter for multiple choice)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark NeMo RL evaluates by name: where its rows are and how they are read."""

    name: str
    task_name: str
    processor: str  # NeMo RL's processor of this dataset
    verifier: str  # env.math.verifier_type its NeMo RL config uses
    columns: tuple[str, ...]  # hub columns every row needs
    load: Callable[[EvalDataSection], Iterable[Row]]  # from the hub (datasets.load_dataset)
    rekey: Callable[[Row, random.Random], Row]  # hub row -> the processor's input
    response: bool = False  # a response dataset: `data.processor` picks its processor


def _hub(*args: Any, **kwargs: Any) -> Any:
    import datasets  # lazy: ~1 s to import, and only hub benchmarks need it

    return datasets.load_dataset(*args, **kwargs)


def _messages(problem: Any, answer: Any, task_name: str) -> Row:
    return {
        "messages": [
            {"role": "user", "content": problem},
            {"role": "assistant", "content": str(answer)},  # AIME 2026 stores ints
        ],
        "task_name": task_name,
    }


def _aime(year: str, key: str) -> Benchmark:
    def load(data: EvalDataSection) -> Iterable[Row]:
        if year == "2025":  # two configs, concatenated (I then II)
            parts = [
                _hub("opencompass/AIME2025", f"AIME2025-{p}", split="test") for p in ("I", "II")
            ]
            return [row for part in parts for row in part]
        repo = {"2024": "HuggingFaceH4/aime_2024", "2026": "MathArena/aime_2026"}[year]
        return _hub(repo, split="train")

    return Benchmark(
        f"AIME{year}", f"AIME{year}", "math_hf_data_processor", "math", (key, "answer"), load,
        lambda row, _: _messages(row[key], row["answer"], f"AIME{year}"), response=True,
    )  # fmt: skip


def _gsm8k_answer(text: str) -> str:
    """NeMo RL's `_extract_hash_answer`: the text after "####" (where NeMo RL would score
    against None, a row without one is an error here)."""
    if "####" not in text:
        raise ValueError("its 'answer' has no '#### <answer>' line")
    return text.split("####")[1].strip()


def _gsm8k(name: str) -> Benchmark:
    # NeMo RL's GSM8K defaults to the train split; evaluation reads `test` unless data.split
    return Benchmark(
        name, "gsm8k", "math_hf_data_processor", "math", ("question", "answer"),
        lambda data: _hub("openai/gsm8k", "main", split=data.split or "test"),
        lambda row, _: _messages(row["question"], _gsm8k_answer(str(row["answer"])), "gsm8k"),
        response=True,
    )  # fmt: skip


def _math(name: str, variant: str) -> Benchmark:
    return Benchmark(
        name, variant, "math_data_processor", "math", ("Question", "Answer"),
        lambda _: _hub("csv", data_files=f"{SIMPLE_EVALS}/{variant}.csv", split="train"),
        lambda row, _: {"problem": row["Question"], "expected_answer": row["Answer"]},
    )  # fmt: skip


def _gpqa_rekey(row: Row, rng: random.Random) -> Row:
    """NeMo RL's GPQA `_rekey`: the four answers in a random order, the letter of the right
    one. NeMo RL draws from an unseeded `random.Random()`; sftkit seeds it with eval.seed,
    so a rerun asks the same questions in the same order."""
    choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"],
               row["Incorrect Answer 3"]]  # fmt: skip
    choices = [choices[i] for i in rng.sample(range(4), 4)]
    return {
        "question": row["Question"],
        "options": dict(zip("ABCD", choices, strict=True)),
        "answer": "ABCD"[choices.index(row["Correct Answer"])],
    }


def _gpqa(name: str, variant: str) -> Benchmark:
    return Benchmark(
        name, f"GPQA_{variant}", "multichoice_qa_processor", "multilingual_multichoice",
        ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
         "Incorrect Answer 3"),
        lambda _: _hub("Idavidrein/gpqa", f"gpqa_{variant}", split="train"), _gpqa_rekey,
    )  # fmt: skip


def _mmlu(language: str | None) -> Benchmark:
    file = f"mmlu_{language}.csv" if language else "mmlu.csv"
    return Benchmark(
        f"mmlu_{language}" if language else "mmlu", f"MMLU_{language or 'EN-US'}",
        "multichoice_qa_processor", "multilingual_multichoice",
        ("Question", "A", "B", "C", "D", "Answer", "Subject"),
        lambda _: _hub("csv", data_files=f"{SIMPLE_EVALS}/{file}", split="train"),
        lambda row, _: {"question": row["Question"], "options": {k: row[k] for k in "ABCD"},
                        "answer": row["Answer"], "subject": row["Subject"]},
    )  # fmt: skip


def _mmlu_pro_rekey(row: Row, _: random.Random) -> Row:
    options = row["options"]
    if not isinstance(options, Sequence) or isinstance(options, str):
        raise ValueError(f"'options' is {type(options).__name__}, not a list of answers")
    return {
        "question": row["question"],
        "options": {chr(ord("A") + i): op for i, op in enumerate(options)},
        "answer": row["answer"],
        "subject": row["category"],
    }


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        _aime("2024", "problem"), _aime("2025", "question"), _aime("2026", "problem"),
        _gsm8k("GSM8K"), _gsm8k("gsm8k"),
        _math("math", "math_test"), _math("math500", "math_500_test"),
        _gpqa("gpqa", "main"), _gpqa("gpqa_diamond", "diamond"),
        _mmlu(None), *(_mmlu(lang) for lang in MMLU_LANGUAGES),
        Benchmark(
            "mmlu_pro", "MMLU-Pro", "multichoice_qa_processor", "english_multichoice",
            ("question", "options", "answer", "category"),
            lambda _: _hub("TIGER-Lab/MMLU-Pro", split="test"), _mmlu_pro_rekey,
        ),
    )
}  # fmt: skip


# -- rows ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """The rows to evaluate, rekeyed for `processor`, and what scores them."""

    name: str  # the benchmark or data file (the result's `dataset`)
    processor: str
    verifier: str
    rows: list[Row]


def load_source(cfg: EvalConfig) -> Source:
    """`data.*`'s rows (max_samples, then repeat), rekeyed for their processor."""
    data = cfg.data
    benchmark = BENCHMARKS.get(data.dataset_name or "")
    verifier = cfg.env.math.verifier_type
    if benchmark is not None:
        rows = _benchmark_rows(benchmark, data, cfg.eval.seed)
        source = Source(
            benchmark.name, _processor(benchmark, data), verifier or benchmark.verifier, rows
        )
    elif data.dataset_name:  # NeMo RL's LocalMathDataset: a file or URL with two columns
        raw = _limit(_local_or_url(data.dataset_name, data), data.max_samples)
        rows = [{"problem": r["problem"], "expected_answer": r["expected_answer"]}
                for r in _rekey_columns(raw, data, data.dataset_name)]  # fmt: skip
        source = Source(data.dataset_name, "math_data_processor", verifier or "math", rows)
    else:  # sftkit's local data: the problem as the user turn, rendered as training does
        assert data.data_path is not None  # checked when the config loads
        from sftkit.data.datasets.files import read_rows

        raw = _limit(read_rows(data.data_path, split=data.split), data.max_samples)
        rows = [_messages(r["problem"], r["expected_answer"], "eval")
                for r in _rekey_columns(raw, data, data.data_path)]  # fmt: skip
        source = Source(data.data_path, "math_hf_data_processor", verifier or "math", rows)
    return Source(source.name, source.processor, source.verifier, source.rows * data.repeat)


def _limit(rows: Iterable[Row], n: int | None) -> list[Row]:
    out: list[Row] = []
    for row in rows:
        if n is not None and len(out) >= n:
            break
        out.append(row)
    return out


def _benchmark_rows(benchmark: Benchmark, data: EvalDataSection, seed: int) -> list[Row]:
    raw: Iterable[Row]
    if data.data_path:  # a local copy in the hub's columns: offline
        from sftkit.data.datasets.files import read_rows

        where, raw = data.data_path, read_rows(data.data_path, split=data.split)
    else:
        where = f"the hub's {benchmark.name}"
        try:
            raw = benchmark.load(data)
        except (OSError, ValueError, ConnectionError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"data.dataset_name={benchmark.name!r}: cannot load it from the hub ({first}). "
                "Offline, set data.data_path to a local copy of it in the hub's columns "
                f"({', '.join(benchmark.columns)})."
            ) from None
    # One generator for the whole set, seeded once (GPQA's shuffles draw from it in order).
    rng = random.Random(seed)
    rows = []
    for i, row in enumerate(_limit(raw, data.max_samples)):
        missing = [c for c in benchmark.columns if row.get(c) is None]
        if missing:
            raise DataError(
                str(row.get("_origin", f"{where}, row {i}")),
                f"no {missing[0]!r} value; {benchmark.name} rows need the hub's columns "
                f"{list(benchmark.columns)} (keys: {sorted(k for k in row if k != '_origin')}).",
                "give a local copy in the benchmark's hub schema.",
            )
        try:
            rows.append(benchmark.rekey(row, rng))
        except ValueError as err:
            raise DataError(str(row.get("_origin", f"{where}, row {i}")), f"{err}.",
                            f"give {benchmark.name}'s rows in its hub schema.") from None  # fmt: skip
    return rows


def _processor(benchmark: Benchmark, data: EvalDataSection) -> str:
    """NeMo RL applies `data.processor` to response datasets (AIME, GSM8K) only; its eval
    datasets keep their own (mmlu.yaml inherits math_hf_data_processor and uses its own)."""
    chosen = data.processor
    if chosen in (None, "default"):
        return "math_hf_data_processor" if chosen == "default" else benchmark.processor
    if benchmark.response:
        if chosen != "math_hf_data_processor":
            raise ValueError(
                f"data.processor={chosen!r}: {benchmark.name} rows are messages, which "
                "math_hf_data_processor (NeMo RL's default) reads; set data.processor to it."
            )
        return chosen
    if chosen != benchmark.processor:
        logger.info("%s uses its own processor %s, as in NeMo RL (data.processor=%s is for "
                    "response datasets such as AIME)", benchmark.name, benchmark.processor, chosen)  # fmt: skip
    return benchmark.processor


def _local_or_url(name: str, data: EvalDataSection) -> Iterable[Row]:
    if name.startswith(("http://", "https://")):
        fmt = data.file_format or ("json" if name.endswith((".json", ".jsonl")) else "csv")
        try:
            return list(_hub(fmt, data_files=name, split=data.split or "train"))
        except (OSError, ValueError, ConnectionError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"data.dataset_name={name!r}: cannot download it ({first}). Offline, give a "
                "local copy: data.dataset_name=<path>."
            ) from None
    if not Path(name).expanduser().exists():
        raise ValueError(
            f"data.dataset_name={name!r} is neither a benchmark nor a file. Benchmarks: "
            f"{', '.join(b for b in BENCHMARKS if not b.startswith('mmlu_'))}, mmlu_<LANG> "
            f"({', '.join(MMLU_LANGUAGES)}); or give a local file / URL with "
            "data.problem_key / data.solution_key columns."
        )
    from sftkit.data.datasets.files import read_rows

    return read_rows(name, split=data.split)


def _rekey_columns(rows: list[Row], data: EvalDataSection, where: str) -> list[Row]:
    out = []
    for i, row in enumerate(rows):
        for key in (data.problem_key, data.solution_key):
            if row.get(key) is None:
                raise DataError(
                    str(row.get("_origin", f"{where}, row {i}")),
                    f"no {key!r} value (keys: {sorted(k for k in row if k != '_origin')}).",
                    "set data.problem_key / data.solution_key to your columns.",
                )
        out.append({"problem": row[data.problem_key], "expected_answer": row[data.solution_key]})
    return out


# -- processors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec:
    """The prompt and system prompt files' text, and the chat template's variables."""

    prompt: str | None
    system_prompt: str | None
    template_kwargs: dict[str, Any]


def prompt_spec(cfg: EvalConfig) -> PromptSpec:
    from sftkit.data.datasets.base import read_prompt_text

    data = cfg.data
    prompt = read_prompt_text(data.prompt_file, "prompt_file") if data.prompt_file else None
    system = (read_prompt_text(data.system_prompt_file, "system_prompt_file")
              if data.system_prompt_file else None)  # fmt: skip
    return PromptSpec(prompt, system, dict(cfg.tokenizer.chat_template_kwargs or {}))


def _render(tokenizer: Any, messages: list[Row], spec: PromptSpec, generation: bool) -> str:
    return str(tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation, **spec.template_kwargs
    ))  # fmt: skip


def _format(template: str, text: str, where: str) -> str:
    try:
        return template.format(text)
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(
            f"data.prompt_file: cannot fill it ({err}); {where} fills one {{}} with the "
            "problem: write literal braces as {{ and }}."
        ) from None


def math_hf_data_processor(row: Row, spec: PromptSpec, tokenizer: Any) -> EvalItem:
    """NeMo RL's `math_hf_data_processor`: the first message is the problem, the second the
    ground truth; system prompt and formatted problem rendered together."""
    problem, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    text = _format(spec.prompt, problem, "math_hf_data_processor") if spec.prompt else problem
    messages.append({"role": "user", "content": text})
    return EvalItem(str(problem), _render(tokenizer, messages, spec, True), str(answer))


def _system_then_user(user: str, spec: PromptSpec, tokenizer: Any) -> str:
    """NeMo RL's math and multiple-choice processors render the system prompt on its own and
    the user turn on its own, then join the two (the template may add its default system
    prompt to the second: the same text NeMo RL's model sees)."""
    system = ""
    if spec.system_prompt:
        system = _render(
            tokenizer, [{"role": "system", "content": spec.system_prompt}], spec, False
        )
    return system + _render(tokenizer, [{"role": "user", "content": user}], spec, True)


def math_data_processor(row: Row, spec: PromptSpec, tokenizer: Any) -> EvalItem:
    """NeMo RL's `math_data_processor`: `problem` formatted into the prompt file."""
    problem = str(row["problem"])
    user = _format(spec.prompt, problem, "math_data_processor") if spec.prompt else problem
    return EvalItem(problem, _system_then_user(user, spec, tokenizer), str(row["expected_answer"]))


def multichoice_prompt(prompt: str, question: str, options: dict[str, Any]) -> str:
    """NeMo RL's `_construct_multichoice_prompt`: the instructions, the question, then one
    `X) option` line per non-null option."""
    lines = "\n".join(f"{letter}) {option}" for letter, option in options.items()
                      if option is not None)  # fmt: skip
    return f"{prompt}\n\nQuestion: {question}\nOptions:\n{lines}"


def multichoice_qa_processor(row: Row, spec: PromptSpec, tokenizer: Any) -> EvalItem:
    """NeMo RL's `multichoice_qa_processor`: without a prompt file the model sees the bare
    question (no options), as in NeMo RL; the reference is the answer letter."""
    question = str(row["question"])
    user = multichoice_prompt(spec.prompt, question, row["options"]) if spec.prompt else question
    return EvalItem(question, _system_then_user(user, spec, tokenizer), str(row["answer"]))


PROCESSORS: dict[str, Callable[[Row, PromptSpec, Any], EvalItem]] = {
    "math_hf_data_processor": math_hf_data_processor,
    "math_data_processor": math_data_processor,
    "multichoice_qa_processor": multichoice_qa_processor,
}


def build_items(source: Source, spec: PromptSpec, tokenizer: Any) -> list[EvalItem]:
    """Every row through its processor, with BOS in front where training adds it."""
    process = PROCESSORS[source.processor]
    bos = tokenizer.bos_token
    items = []
    for row in source.rows:
        item = process(row, spec, tokenizer)
        if bos and not item.prompt.startswith(bos):
            item = EvalItem(item.problem, bos + item.prompt, item.reference)
        items.append(item)
    return items
