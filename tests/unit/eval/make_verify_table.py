"""Write `verify_table.json`: answer pairs labelled by NeMo RL's own verification path.

    PYTHONPATH=. python tests/unit/eval/make_verify_table.py

The labels (score and extracted answer) come from `nemo_rl_verify` below: the body of NeMo
RL's `HFVerifyWorker.verify` / `EnglishMultichoiceVerifyWorker.verify` /
`MultilingualMultichoiceVerifyWorker.verify` and `_select_extracted_answer`
(nemo_rl/environments/math_environment.py at commit 7ea279abfbeb698b092856d0dab61e7cf39bc909,
Apache-2.0), with only the Ray decorators and the `dapo_math_verify` branch removed, and
`answer_parsing` being NeMo RL's file at that commit (vendored verbatim as
sftkit/eval/answer_parsing.py). `test_eval_verify.py` checks sftkit's verifier gives every row's
label. Rerun after adding rows or upgrading math-verify.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("verify_table.json")

# (verifier_type, ground truth as the benchmarks store it, a model's generation)
ROWS: list[tuple[str, str, str]] = [
    # fractions
    ("math", "\\frac{1}{2}", "The answer is $\\boxed{0.5}$."),
    ("math", "\\frac{1}{2}", "So $x = \\boxed{\\frac{2}{4}}$"),
    ("math", "\\frac{3}{4}", "Therefore the probability is $\\boxed{\\dfrac{3}{4}}$."),
    ("math", "\\frac{3}{4}", "\\boxed{3/4}"),
    ("math", "\\frac{3}{4}", "\\boxed{\\frac{4}{3}}"),
    ("math", "-\\frac{1}{3}", "The slope is \\boxed{-1/3}"),
    ("math", "\\frac{14}{3}", "$\\boxed{4\\frac{2}{3}}$"),
    # radicals
    ("math", "\\frac{\\sqrt{2}}{2}", "$\\boxed{\\frac{1}{\\sqrt{2}}}$"),
    ("math", "2\\sqrt{3}", "We get $\\boxed{\\sqrt{12}}$"),
    ("math", "2\\sqrt{3}", "We get $\\boxed{3\\sqrt{2}}$"),
    ("math", "\\frac{1+\\sqrt{5}}{2}", "$\\boxed{\\frac{\\sqrt{5}+1}{2}}$"),
    ("math", "3\\sqrt[3]{2}", "\\boxed{\\sqrt[3]{54}}"),
    # intervals and sets
    ("math", "[1,2)", "The solution set is $\\boxed{[1, 2)}$"),
    ("math", "[1,2)", "The solution set is $\\boxed{(1, 2]}$"),
    ("math", "(-\\infty, 3]", "\\boxed{(-\\infty,3]}"),
    ("math", "(0,1)\\cup(2,\\infty)", "$x \\in \\boxed{(0,1) \\cup (2, \\infty)}$"),
    ("math", "\\{2, 3\\}", "\\boxed{\\{3, 2\\}}"),
    ("math", "(1, 2)", "The point is $\\boxed{(1,2)}$"),
    # units, percent, money, degrees
    ("math", "10\\text{ cm}", "\\boxed{10 \\text{ cm}}"),
    ("math", "10", "The side is \\boxed{10\\text{ cm}}"),
    ("math", "45^\\circ", "The angle is $\\boxed{45}$ degrees."),
    ("math", "18.90", "The total is \\boxed{\\$18.90}"),
    ("math", "25\\%", "\\boxed{25\\%}"),
    ("math", "1000", "\\boxed{1,000}"),
    # nested braces and nested \boxed{}
    ("math", "\\frac{1}{2}", "\\boxed{\\boxed{\\frac{1}{2}}}"),
    ("math", "\\frac{\\sqrt{3}}{2}", "so $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$"),
    ("math", "\\frac{\\pi}{4}", "\\boxed{\\frac{\\pi}{4}}"),
    ("math", "4", "First try \\boxed{3}, but that fails; so the answer is \\boxed{4}"),
    (
        "math",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}",
    ),
    # expressions
    ("math", "x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("math", "\\pi/4", "$\\boxed{\\frac{\\pi}{4}}$"),
    ("math", "3", "\\boxed{3.0}"),
    ("math", "x=2", "\\boxed{2}"),
    ("math", "-1", "\\boxed{e^{i\\pi}}"),
    # plain text: "Answer:", the last number, none
    ("math", "5", "2 + 3 = 5"),
    ("math", "5", "Answer: 5"),
    ("math", "72", "First 12, then 36, so the final answer is 72."),
    ("math", "72", "She had 72 apples and gave away 2, leaving 70"),
    ("math", "204", "#### 204"),
    ("math", "17", "I do not know."),
    # letters through the math verifier (MATH-style choices)
    ("math", "B", "\\boxed{B}"),
    ("math", "B", "Answer: B"),
    # multiple choice, English (MMLU, MMLU-Pro)
    ("english_multichoice", "A", "Answer: A"),
    ("english_multichoice", "C", "**Answer:** C"),
    ("english_multichoice", "C", "Answer: $\\boxed{C}$"),
    ("english_multichoice", "D", "answer: b"),
    ("english_multichoice", "B", "The answer is B"),
    ("english_multichoice", "J", "Thinking... Answer: J"),
    # multiple choice, multilingual (GPQA, MMLU zh-CN)
    ("multilingual_multichoice", "C", "答案：C"),
    ("multilingual_multichoice", "B", "Réponse : B"),
    ("multilingual_multichoice", "A", "الإجابة: أ"),
    ("multilingual_multichoice", "D", "Antwort: Ｄ"),
    ("multilingual_multichoice", "A", "Answer: E"),
    ("multilingual_multichoice", "B", "Let me think. Answer: B"),
    ("multilingual_multichoice", "C", "Answer: \\boxed{C}"),
]


# -- NeMo RL's verification, as run by its workers (reference; see the module docstring) --
def _select_extracted_answer(extracted_answer: Any, math_verify_impl: str) -> str | None:
    from math_verify import grader

    if math_verify_impl == "dapo_math_verify":
        return extracted_answer if isinstance(extracted_answer, str) else None
    if extracted_answer is None or len(extracted_answer) != 2:
        return None
    extracted_gold, extracted_prediction = extracted_answer
    for pred in extracted_prediction:
        if any(grader.verify(gold, pred) for gold in extracted_gold):
            return pred
    return extracted_prediction[0] if extracted_prediction else None


@contextlib.contextmanager
def _mute_output() -> Any:
    devnull_out, devnull_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(devnull_out), contextlib.redirect_stderr(devnull_err):
        yield


def hf_verify(response: str, ground_truth: str) -> tuple[float, str | None]:
    """`HFVerifyWorker.__init__` + `.verify` for one sample, return_extracted_answer=True."""
    from math_verify.errors import TimeoutException
    from math_verify.metric import math_metric
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    verify_func = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )
    score: float = 0.0
    extracted: str | None = None
    math_verify_impl = "hf_math_verify"
    try:
        with _mute_output():
            ground_truth_parsable = "\\boxed{" + ground_truth + "}"
            ret_score, extracted_answer = verify_func([ground_truth_parsable], [response])
        score = float(ret_score)
    except (Exception, TimeoutException):
        score = 0.0
    else:
        extracted = _select_extracted_answer(extracted_answer, math_verify_impl)
    return score, extracted


def english_multichoice_verify(response: str, ground_truth: str) -> tuple[float, str | None]:
    """`EnglishMultichoiceVerifyWorker.verify` for one sample."""
    from sftkit.eval import answer_parsing

    ground_truth = answer_parsing.normalize_response(ground_truth)
    response = answer_parsing.normalize_response(response)
    extracted_answer = None
    match = re.search(r"(?i)Answer\s*:[ \t]*([A-Z])", response)
    if match:
        extracted_answer = answer_parsing.normalize_extracted_answer(match.group(1))
    score = 1.0 if extracted_answer == ground_truth else 0.0
    return score, extracted_answer


def multilingual_multichoice_verify(response: str, ground_truth: str) -> tuple[float, str | None]:
    """`MultilingualMultichoiceVerifyWorker.verify` for one sample."""
    from sftkit.eval import answer_parsing

    response = answer_parsing.normalize_response(response)
    extracted_answer = None
    for answer_regex in answer_parsing.MULTILINGUAL_ANSWER_REGEXES:
        regex = answer_parsing.MULTILINGUAL_ANSWER_PATTERN_TEMPLATE.format(answer_regex)
        match = re.search(regex, response)
        if match:
            extracted_answer = answer_parsing.normalize_extracted_answer(match.group(1))
            break
    score = 1.0 if extracted_answer == ground_truth else 0.0
    return score, extracted_answer


NEMO_RL_VERIFY = {
    "math": hf_verify,
    "english_multichoice": english_multichoice_verify,
    "multilingual_multichoice": multilingual_multichoice_verify,
}


def main() -> None:
    from importlib.metadata import version

    rows = []
    for verifier_type, truth, response in ROWS:
        score, answer = NEMO_RL_VERIFY[verifier_type](response, truth)
        rows.append({"verifier_type": verifier_type, "ground_truth": truth,
                     "response": response, "score": score, "answer": answer})  # fmt: skip
    table = {"source": "nemo_rl/environments/math_environment.py@7ea279ab",
             "math_verify": version("math-verify"), "rows": rows}  # fmt: skip
    TABLE.write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    right = sum(r["score"] == 1.0 for r in rows)
    print(f"wrote {TABLE}: {len(rows)} rows, {right} scored 1.0")


if __name__ == "__main__":
    main()
