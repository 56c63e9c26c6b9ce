"""sftkit's answer checks give NeMo RL's labels, and a pathological answer cannot hang a run.

The table (`verify_table.json`) is written by `make_verify_table.py`, which runs NeMo RL's
own verification code (math-verify as its `HFVerifyWorker` calls it, its multiple-choice
workers) on every row; no label here is written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkit.config import ConfigError
from sftkit.eval.verify import CHECKS, MathEnv, Verdict, VerifierPool, score_groups

HERE = Path(__file__).parent
TABLE = json.loads((HERE / "verify_table.json").read_text())


def test_table_covers_the_benchmark_formats_and_matches_its_script() -> None:
    from make_verify_table import ROWS  # this directory is on sys.path (as bench_module)

    rows = TABLE["rows"]
    assert [(r["verifier_type"], r["ground_truth"], r["response"]) for r in rows] == ROWS
    assert len(rows) >= 40 and TABLE["source"].endswith("@7ea279ab")
    scores = {r["score"] for r in rows}
    assert scores == {0.0, 1.0}  # both outcomes are exercised
    kinds = {r["verifier_type"] for r in rows}
    assert kinds == set(CHECKS)


@pytest.mark.parametrize(
    "row", TABLE["rows"], ids=lambda r: f"{r['verifier_type']}:{r['response'][:30]}"
)
def test_sftkit_check_agrees_with_nemo_rl(row: dict) -> None:
    # The function each worker runs, called in this process (the pool is tested below).
    score, answer = CHECKS[row["verifier_type"]](row["response"], row["ground_truth"])
    assert (score, answer) == (row["score"], row["answer"])


def test_env_math_is_read_as_nemo_rl_writes_it() -> None:
    assert MathEnv.from_env({}) == MathEnv("math", 8)
    assert MathEnv.from_env({"math": {"num_workers": 2, "verifier_type": "english_multichoice"}}) \
        == MathEnv("english_multichoice", 2)  # fmt: skip
    with pytest.raises(ConfigError, match="env.math.verifier_type='mcq'; choose one of math"):
        MathEnv.from_env({"math": {"verifier_type": "mcq"}})
    with pytest.raises(ConfigError, match="math_verify_impl='dapo_math_verify': sftkit impl"):
        MathEnv.from_env({"math": {"math_verify_impl": "dapo_math_verify"}})
    with pytest.raises(ConfigError, match="env.math.num_workers=0 must be an integer >= 1"):
        MathEnv.from_env({"math": {"num_workers": 0}})


def test_letters_are_checked_without_starting_workers() -> None:
    pool = VerifierPool("multilingual_multichoice", num_workers=4)
    assert pool.check(["答案：C", "Answer: E"], ["C", "A"]) == [
        Verdict(1.0, "C"), Verdict(0.0, None)
    ]  # fmt: skip
    assert pool._workers == []


@pytest.mark.slow
def test_pool_scores_the_table_and_times_out_a_pathological_answer() -> None:
    """Workers give the table's labels; `9^{9^{9^{9}}}` (5 s of sympy before math-verify's
    own alarm) is killed at 1 s, scores 0 and is counted; a fresh worker takes its place."""
    rows = [r for r in TABLE["rows"] if r["verifier_type"] == "math"]
    with VerifierPool("math", num_workers=2, timeout_s=120.0) as pool:
        assert pool._workers == []  # started lazily
        verdicts = pool.check([r["response"] for r in rows], [r["ground_truth"] for r in rows])
        assert [(v.score, v.answer) for v in verdicts] == [(r["score"], r["answer"]) for r in rows]
        assert pool.timed_out == 0 and len(pool._workers) == 2
        pool.timeout_s = 1.0
        stuck = pool.check(["\\boxed{9^{9^{9^{9}}}}"], ["9^{9^{9}}"])
        assert stuck == [Verdict(0.0, None, timed_out=True)] and pool.timed_out == 1
        pool.timeout_s = 120.0  # a loaded machine: only the replacement is under test here
        assert pool.check(["\\boxed{\\frac{1}{2}}"] * 2, ["0.5"] * 2) == [Verdict(1.0, "1/2")] * 2
    assert pool._workers == []


def test_pass_and_cons_at_k_use_the_checked_answers() -> None:
    pool = VerifierPool("english_multichoice")
    groups = [["Answer: B", "Answer: C", "Answer: B", "no idea"], ["Answer: A", "Answer: D"]]
    scored = score_groups(pool, groups, ["B", "A"], "pass@k", 2)
    assert [s.value for s in scored] == [pytest.approx(1 - 1 / 6), 1.0]  # 1 - C(2,2)/C(4,2)
    assert [s.answers for s in scored] == [["B", "C", "B", None], ["A", "D"]]
    # cons@k votes on the extracted answers (NeMo RL's majority vote), first k samples
    voted = score_groups(pool, groups, ["B", "A"], "cons@k", 3)
    assert [(s.value, s.first_right) for s in voted] == [(1.0, True), (1.0, True)]
    assert (
        score_groups(pool, [["Answer: C", "Answer: C", "Answer: B"]], ["B"], "cons@k", 3)[0].value
        == 0.0
    )
