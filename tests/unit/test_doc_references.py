"""No file refers to documents outside the repository; every `docs/` file named exists.

The design notes and measurement digests that sftkit was built from live outside the
repository; a reader of the code has only the repository, so a fact the code relies on is
stated where it is used or in `docs/` (e.g. `docs/perf.md`), never pointed at elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The repository's own folders and top-level files (what a checkout holds, without a
# virtual environment, caches or run outputs).
ROOTS = ("sftkit", "tests", "bench", "examples", "docs", ".ci")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"}
# Documents that exist only outside the repository (the design notes, their digests of other
# projects, the seed guide) and the paths that lead there.
OUTSIDE = re.compile(
    r"(?<![\w/])reference/|\bDESIGN\.md|\bSTYLE\.md|(?<!docs/)\bperf\.md|nemo_rl_sft\b|"
    r"sft-guide|\baesthetics\b|\bpeers\.md|\breliability\.md|ecosystem-20\d\d|"
    r"\.\./shared|/work/shared"
)
DOCS_LINK = re.compile(r"\bdocs/([\w./-]+\.md)")


def repository_files() -> list[Path]:
    files = [p for p in REPO.iterdir() if p.is_file() and p.suffix in SUFFIXES]
    for root in ROOTS:
        base = REPO / root
        if base.is_dir():
            files += [
                p
                for p in base.rglob("*")
                if p.is_file()
                and p.suffix in SUFFIXES
                and "__pycache__" not in p.parts
                and not p.name.startswith(".")
            ]
    return sorted(files)


def outside_references(text: str) -> list[str]:
    return [m.group(0) for m in OUTSIDE.finditer(text)]


def missing_docs(text: str) -> list[str]:
    return [f"docs/{m}" for m in DOCS_LINK.findall(text) if not (REPO / "docs" / m).is_file()]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("see `reference/perf.md` section 2", ["reference/", "perf.md"]),
        ("the order of DESIGN.md", ["DESIGN.md"]),
        ("STYLE.md item 9", ["STYLE.md"]),
        ("as digested in nemo_rl_sft section 1", ["nemo_rl_sft"]),
        ("open ../shared/notes.txt", ["../shared"]),
        ("the seed guide (sft-guide.md)", ["sft-guide"]),
        ("the numbers of `docs/perf.md` section 1", []),
        ("def test_nemo_flag_matches_nemo_rl_sft_yaml", []),
        ("torchtune's cross_entropy, see tests/fixtures/nemo_configs", []),
    ],
)
def test_the_pattern_finds_outside_documents(text: str, found: list[str]) -> None:
    assert outside_references(text) == found


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    files = repository_files()
    assert len(files) > 100, "the walk found too few files: REPO or ROOTS is wrong"
    this = Path(__file__).resolve()
    bad = []
    for path in files:
        if path.resolve() == this:  # its patterns and examples name them on purpose
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for ref in outside_references(line) + missing_docs(line):
                bad.append(f"{path.relative_to(REPO)}:{number}: {ref}")
    assert not bad, (
        "these lines point at documents that are not in the repository; state the facts "
        "in place or in a docs/ file:\n" + "\n".join(bad)
    )
