"""One error type for bad data: it names where the problem is and how to fix it."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem.

    The message reads `<where>: <what is wrong>. <how to fix it>`, where `<where>` is a file
    and line (`train.jsonl:12`), or a dataset and row index (`squad[train] row 7`).
    """

    def __init__(self, where: str, problem: str, fix: str = "") -> None:
        self.where = where
        self.problem = problem
        self.fix = fix
        text = f"{where}: {problem}"
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, str]]:
        # Errors raised in tokenization workers cross a process boundary by pickling.
        return (DataError, (self.where, self.problem, self.fix))
