"""Answers checked as NeMo RL's `env.math` checks them: math by equivalence, letters by regex.

`verifier_type` (NeMo RL's `env.math.verifier_type`) picks the check:
- `math`: `math-verify` called as NeMo RL's `HFVerifyWorker` calls it (nemo_rl/environments/
  math_environment.py at 7ea279ab): the reference wrapped in `\\boxed{}` and read as LaTeX,
  the generation read as LaTeX (`\\boxed{}` with nested braces, `$...$`) or as a plain
  expression (the last number or formula, "Answer: 3/4"), compared by sympy equivalence
  (fractions, radicals, intervals, units dropped). Each answer runs in a worker process
  with a hard timeout: a pathological expression (`9^{9^{9^{9}}}`) scores 0 and is counted,
  never hangs the run.
- `english_multichoice`: the letter after "Answer:" equals the reference letter.
- `multilingual_multichoice`: the same in 40-odd languages' spelling of "Answer".
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import multiprocessing as mp
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from sftkit.config.errors import ConfigError
from sftkit.eval import answer_parsing

logger = logging.getLogger("sftkit")

VERIFIER_TYPES = ("math", "english_multichoice", "multilingual_multichoice")
# math-verify's own signal timeouts add up to about 17 s (parse 5 + 5, verify 5, str 2);
# past that the worker is stuck in code the signal cannot interrupt.
ANSWER_TIMEOUT_S = 20.0
_READY_TIMEOUT_S = 120.0  # a worker importing sympy on a loaded machine


@dataclass(frozen=True)
class Verdict:
    """One answer's check: 1.0/0.0, the answer read from the generation (the cons@k vote),
    and whether the check was killed for running past its timeout."""

    score: float
    answer: str | None
    timed_out: bool = False


@dataclass(frozen=True)
class MathEnv:
    """NeMo RL's `env.math` section, as far as scoring goes."""

    verifier_type: str = "math"
    num_workers: int = 8

    @classmethod
    def from_env(cls, env: Any) -> MathEnv:
        """Read `env.math` of an eval config (a mapping or a config section); bad values name
        their key."""
        if dataclasses.is_dataclass(env) and not isinstance(env, type):
            env = dataclasses.asdict(env)
        math_env = env.get("math") or {}
        if not isinstance(math_env, dict):
            raise ConfigError(f"env.math must be a mapping, got {math_env!r}.", path="env.math")
        verifier = math_env.get("verifier_type") or "math"
        if verifier not in VERIFIER_TYPES:
            raise ConfigError(
                f"env.math.verifier_type={verifier!r}; choose one of {', '.join(VERIFIER_TYPES)}.",
                path="env.math.verifier_type",
            )
        impl = math_env.get("math_verify_impl") or "hf_math_verify"
        if impl != "hf_math_verify":
            raise ConfigError(
                f"env.math.math_verify_impl={impl!r}: sftkit implements 'hf_math_verify' only "
                "(math-verify); remove the key or set it to hf_math_verify.",
                path="env.math.math_verify_impl",
            )
        workers = math_env.get("num_workers", 8)
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(
                f"env.math.num_workers={workers!r} must be an integer >= 1.",
                path="env.math.num_workers",
            )
        return cls(verifier_type=verifier, num_workers=workers)


# -- the checks (run in the worker for math) --------------------------------------------
_MATH_METRIC: Any = None


def _math_metric() -> Any:
    """NeMo RL's `HFVerifyWorker.verify_func`: gold read as LaTeX, prediction as either."""
    global _MATH_METRIC
    if _MATH_METRIC is None:
        from math_verify.metric import math_metric
        from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        _MATH_METRIC = math_metric(
            gold_extraction_target=(LatexExtractionConfig(),),
            pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
        )
    return _MATH_METRIC


def verify_math(response: str, ground_truth: str) -> tuple[float, str | None]:
    """(score, extracted answer) of one generation, as NeMo RL's `HFVerifyWorker.verify`."""
    from math_verify import grader
    from math_verify.errors import TimeoutException

    try:
        # math-verify prints parse failures; a run over thousands of answers would drown
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            score, extracted = _math_metric()(["\\boxed{" + ground_truth + "}"], [response])
        score = float(score)
    # TimeoutException subclasses BaseException: math-verify's own alarm fired
    except (Exception, TimeoutException):
        return 0.0, None
    if extracted is None or len(extracted) != 2:
        return score, None
    golds, preds = extracted
    for pred in preds:  # the prediction that matched, else the first (NeMo RL's choice)
        with contextlib.suppress(Exception, TimeoutException):
            if any(grader.verify(gold, pred) for gold in golds):
                return score, pred
    return score, preds[0] if preds else None


_ENGLISH_ANSWER = re.compile(r"(?i)Answer\s*:[ \t]*([A-Z])")


def verify_english_multichoice(response: str, ground_truth: str) -> tuple[float, str | None]:
    """The letter after "Answer:" (markdown and LaTeX wrappers removed) against the reference."""
    truth = answer_parsing.normalize_response(ground_truth)
    match = _ENGLISH_ANSWER.search(answer_parsing.normalize_response(response))
    answer = answer_parsing.normalize_extracted_answer(match.group(1)) if match else None
    return (1.0 if answer == truth else 0.0), answer


def verify_multilingual_multichoice(response: str, ground_truth: str) -> tuple[float, str | None]:
    """The letter after "Answer:" in any of NeMo RL's languages against the reference."""
    text = answer_parsing.normalize_response(response)
    answer = None
    for regex in answer_parsing.MULTILINGUAL_PATTERNS:
        match = regex.search(text)
        if match:
            answer = answer_parsing.normalize_extracted_answer(match.group(1))
            break
    return (1.0 if answer == ground_truth else 0.0), answer


CHECKS = {
    "math": verify_math,
    "english_multichoice": verify_english_multichoice,
    "multilingual_multichoice": verify_multilingual_multichoice,
}


# -- the worker pool ----------------------------------------------------------------------
def _serve(conn: Connection, verifier_type: str) -> None:
    """Worker loop: (index, response, truth) in, (index, score, answer) out, until None."""
    check = CHECKS[verifier_type]
    if verifier_type == "math":  # warm up before saying ready: the timeout measures checks
        verify_math("\\boxed{\\frac{1}{2}}", "0.5")
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        index, response, truth = task
        conn.send((index, *check(response, truth)))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    task: int | None = None  # the answer index it is checking
    deadline: float = 0.0


class VerifierPool:
    """Checks answers in `num_workers` processes, each answer under `timeout_s`.

    Started on the first `check` call (an eval that never scores math starts nothing) and
    kept for later calls; `close()` (or `with`) stops it. A worker past its deadline is
    killed and replaced; its answer scores 0 and is counted in `timed_out`.
    """

    def __init__(
        self, verifier_type: str = "math", num_workers: int = 2, timeout_s: float = ANSWER_TIMEOUT_S
    ) -> None:
        if verifier_type not in CHECKS:
            raise ValueError(f"verifier_type={verifier_type!r}; choose one of {VERIFIER_TYPES}.")
        self.verifier_type = verifier_type
        self.num_workers = max(1, min(num_workers, os.cpu_count() or 1))
        self.timeout_s = timeout_s
        self.timed_out = 0
        self._workers: list[_Worker] = []
        # forkserver: a clean child without the parent's torch threads or CUDA context, forked
        # from a server that imported sympy once (2 s a worker otherwise)
        self._ctx: Any = mp.get_context("forkserver" if os.name == "posix" else "spawn")
        if os.name == "posix":
            self._ctx.set_forkserver_preload(["math_verify.metric", "math_verify.grader"])

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, responses: list[str], truths: list[str]) -> list[Verdict]:
        """One verdict per (response, truth), in order."""
        if len(responses) != len(truths):
            raise ValueError(f"{len(responses)} responses but {len(truths)} references.")
        if self.verifier_type != "math":  # regexes: no sympy, nothing to time out
            check = CHECKS[self.verifier_type]
            return [Verdict(*check(r, t)) for r, t in zip(responses, truths, strict=True)]
        verdicts: list[Verdict | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        while len(self._workers) < min(self.num_workers, len(responses)):
            self._workers.append(self._start())
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.task is None and pending:
                    index = pending.popleft()
                    worker.conn.send((index, responses[index], truths[index]))
                    worker.task, worker.deadline = index, time.monotonic() + self.timeout_s
            busy = [w for w in self._workers if w.task is not None]
            soonest = min(w.deadline for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, soonest - time.monotonic()))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        index, score, answer = worker.conn.recv()
                    except EOFError:  # the worker died (out of memory): score 0, replace it
                        assert worker.task is not None
                        index, score, answer = worker.task, 0.0, None
                        self._replace(worker)
                    verdicts[index] = Verdict(score, answer)
                    worker.task = None
                elif time.monotonic() >= worker.deadline:
                    assert worker.task is not None
                    verdicts[worker.task] = Verdict(0.0, None, timed_out=True)
                    self.timed_out += 1
                    logger.warning(
                        "answer %d: math-verify ran past %.0f s; scored 0 (%d timed out so far)",
                        worker.task, self.timeout_s, self.timed_out,
                    )  # fmt: skip
                    self._replace(worker)
        return [v for v in verdicts if v is not None]

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                worker.conn.send(None)
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self._workers = []

    def _start(self) -> _Worker:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(theirs, self.verifier_type), daemon=True)
        process.start()
        theirs.close()
        if not ours.poll(_READY_TIMEOUT_S) or ours.recv() != "ready":
            process.kill()
            raise RuntimeError(f"a math-verify worker did not start in {_READY_TIMEOUT_S} s.")
        return _Worker(process, ours)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        fresh = self._start()
        worker.process, worker.conn, worker.task = fresh.process, fresh.conn, None


# -- scoring groups of samples ----------------------------------------------------------------
def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


@dataclass
class PromptScore:
    """One prompt's samples checked: its metric value, whether the first sample is right,
    each sample's extracted answer, and how many checks timed out."""

    value: float
    first_right: bool
    answers: list[str | None]
    timed_out: int


def score_groups(
    pool: VerifierPool, groups: list[list[str]], references: list[str], metric: str, k: int
) -> list[PromptScore]:
    """pass@k (unbiased, over all samples) or cons@k (majority of the first k extracted
    answers; the vote is right when the sample that gave it is) per prompt, all samples
    checked in one pool call."""
    flat = [s for group in groups for s in group]
    truths = [ref for group, ref in zip(groups, references, strict=True) for _ in group]
    verdicts = pool.check(flat, truths)
    scores, start = [], 0
    for group in groups:
        mine = verdicts[start : start + len(group)]
        start += len(group)
        hits = [v.score == 1.0 for v in mine]
        answers = [v.answer for v in mine]
        if metric == "cons@k":
            # NeMo RL's eval_cons_k: the most common answer (None counts too), scored by the
            # first sample that gave it
            vote = Counter(answers[:k]).most_common(1)[0][0]
            value = float(hits[answers.index(vote)])
        elif metric == "pass@k":
            value = pass_at_k(len(hits), sum(hits), k)
        else:
            value = sum(hits) / len(hits)
        scores.append(PromptScore(value, hits[0], answers, sum(v.timed_out for v in mine)))
    return scores
