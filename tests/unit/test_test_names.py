"""The test naming rule of tests/README.md, kept: from a module to its test file by name.

pytest imports test files by basename (the default "prepend" import mode, no `__init__.py`
under tests/), so two files with one basename break collection; the package prefix keeps
them apart: `tests/unit/test_errors.py` tests `sftkit/errors.py`,
`tests/unit/data/test_data_errors.py` tests `sftkit/data/errors.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# tests/unit/test_*.py that are not about one top-level module: checks of the whole tree.
REPO_CHECKS = {"code_style", "doc_references", "import_direction", "test_names", "test_tiers"}


def naming_problems(paths: list[Path], top_modules: set[str]) -> list[str]:
    """Every test file (relative to tests/) that breaks the rule, with the rule it breaks."""
    problems = []
    seen: dict[str, Path] = {}
    for path in paths:
        if path.name != "conftest.py" and path.name in seen:  # conftests load by path
            problems.append(f"{path}: same basename as {seen[path.name]}")
        seen.setdefault(path.name, path)
        if not path.name.startswith("test_"):
            continue  # a helper module (a worker script, fixture paths)
        stem = path.stem[len("test_") :]
        tier, *rest = path.parts
        if tier == "unit" and len(rest) == 2:
            package = rest[0]
            if not stem.startswith(f"{package}_"):
                problems.append(f"{path}: name it test_{package}_<module or behaviour>.py")
        elif tier == "unit" and len(rest) == 1:
            if stem not in top_modules and stem not in REPO_CHECKS:
                problems.append(
                    f"{path}: name a top-level module (sftkit/<name>.py) or add a repo-wide "
                    "check to REPO_CHECKS"
                )
        elif tier == "unit":
            problems.append(f"{path}: one package folder deep at most (tests/unit/<package>/)")
        elif tier == "gpu" and not stem.endswith("_gpu"):
            problems.append(f"{path}: name it test_<topic>_gpu.py")
        elif tier not in ("unit", "gpu", "integration"):
            problems.append(f"{path}: tests live in tests/unit, tests/integration or tests/gpu")
    return problems


def all_test_files() -> list[Path]:
    return sorted(p.relative_to(TESTS) for p in TESTS.rglob("*.py") if "fixtures" not in p.parts)


def top_level_modules() -> set[str]:
    return {p.stem for p in (REPO / "sftkit").glob("*.py") if p.stem != "__init__"}


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("unit/data/test_data_packing.py", None),
        ("unit/data/test_packing.py", "test_data_<module or behaviour>"),
        ("unit/bench/test_bench_lora.py", None),
        ("unit/test_hub.py", None),
        ("unit/test_widgets.py", "top-level module"),
        ("unit/data/sub/test_data_x.py", "one package folder deep"),
        ("gpu/test_loss_gpu.py", None),
        ("gpu/test_loss.py", "test_<topic>_gpu.py"),
        ("unit/model/cp_worker.py", None),
        ("other/test_x.py", "tests live in"),
    ],
)
def test_the_rule(path: str, problem: str | None) -> None:
    found = naming_problems([Path(path)], {"hub"})
    assert (problem in found[0]) if problem else not found


def test_a_repeated_basename_is_reported() -> None:
    found = naming_problems(
        [Path("unit/data/test_data_x.py"), Path("unit/model/test_data_x.py")], set()
    )
    assert any("same basename" in p for p in found)


def test_every_test_file_follows_the_rule() -> None:
    files = all_test_files()
    assert len(files) > 50, "the walk found too few test files"
    problems = naming_problems(files, top_level_modules())
    assert not problems, "see tests/README.md, 'Names':\n" + "\n".join(problems)


def test_readme_maps_every_integration_file() -> None:
    readme = (TESTS / "README.md").read_text()
    files = sorted(p.name for p in (TESTS / "integration").glob("test_*.py"))
    missing = [name for name in files if f"`{name}`" not in readme]
    assert not missing, f"add a line for each to tests/README.md, 'Integration': {missing}"
    named = set(re.findall(r"`(test_\w+\.py)`", readme))
    gone = sorted(n for n in named if not list(TESTS.rglob(n)))
    assert not gone, f"tests/README.md names test files that do not exist: {gone}"
