"""The test tiers stay honest: what starts processes is `slow`, what needs CUDA is in tests/gpu.

`uv run --group dev pytest -m "not slow"` is the tier to run while working (minutes on 2 cores);
`uv run --group dev pytest` runs everything (README, `.ci/run`); `uv run --group dev pytest -m gpu tests/gpu` runs the
CUDA tests on a device. These checks read the test sources, so a new test that forks
ranks, runs a recipe or a bench's tiny mode, or needs CUDA, is put in its tier.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# What makes a test slow: a new process (ranks, the entry-point script, a bench driver,
# Triton's interpreter, mypy) or a recipe run.
SLOW_CALL = re.compile(
    r"subprocess\.(Popen|run)\(|\.subprocess\(|small_run\.start\(|preempted_run|"
    r"run_triton_interpreted|\"--tiny\"|mypy"
)
FAST_SUBPROCESS = {
    "test_ruff_is_clean",  # ruff takes a second
    # a sleeping process stands for another run's live pid (`live_pid`)
    "test_a_live_holder_is_refused_by_name",
    "test_take_over_switch_and_release_keeps_foreign_locks",
    "test_second_run_is_refused_before_the_model_loads",
    "test_same_slurm_job_alone_is_no_evidence",
    "test_a_run_whose_lock_was_taken_over_stops_without_saving",
    "test_tree_rss_anon_counts_children",  # a bare Python child holding 200 MB
}
NEEDS_CUDA = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")


def _decorated_slow(node: ast.AST, source: str) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any("mark.slow" in (ast.get_source_segment(source, d) or "") for d in decorators)


def unmarked_slow_tests(path: Path) -> list[str]:
    """Tests of `path` that start a process (directly, through a module-level helper or a
    fixture of the same module) and are not marked slow."""
    source = path.read_text()
    tree = ast.parse(source)
    if re.search(r"^pytestmark = .*mark\.slow", source, re.MULTILINE):
        return []
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    slow_helpers = set()
    for _ in range(3):  # helpers calling helpers
        for name, node in functions.items():
            text = ast.get_source_segment(source, node) or ""
            called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call)
                      and isinstance(c.func, ast.Name)}  # fmt: skip
            args = {a.arg for a in node.args.args}
            if SLOW_CALL.search(text) or (called | args) & slow_helpers:
                slow_helpers.add(name)
    return [
        f"{path.relative_to(REPO)}::{name}"
        for name, node in functions.items()
        if name.startswith("test_") and name in slow_helpers
        and name not in FAST_SUBPROCESS and not _decorated_slow(node, source)
    ]  # fmt: skip


def test_tests_that_start_processes_are_slow() -> None:
    found = [t for path in sorted(TESTS.rglob("test_*.py")) for t in unmarked_slow_tests(path)]
    assert found == []


def test_the_check_sees_a_forking_test(tmp_path: Path) -> None:
    path = TESTS / "unit" / "tmp_probe_test_tiers.py"
    try:
        path.write_text(
            "import subprocess\n\ndef two_ranks():\n    subprocess" + ".run(['torchrun'])\n\n"
            "def test_a():\n    two_ranks()\n\ndef test_b():\n    pass\n"
        )
        assert unmarked_slow_tests(path) == ["tests/unit/tmp_probe_test_tiers.py::test_a"]
    finally:
        path.unlink()


def test_cuda_tests_live_in_tests_gpu_with_the_gpu_marker() -> None:
    outside = [
        str(p.relative_to(REPO))
        for p in TESTS.rglob("test_*.py")
        if "gpu" not in p.relative_to(TESTS).parts[:1] and NEEDS_CUDA.search(p.read_text())
    ]
    assert outside == []
    gpu_files = sorted((TESTS / "gpu").glob("test_*.py"))
    assert gpu_files
    for path in gpu_files:
        text = path.read_text()
        assert "pytest.mark.gpu" in text and NEEDS_CUDA.search(text), path.name
    device_script = (REPO / "bench" / "gpu_all.sh").read_text()
    assert "tests/gpu" in device_script


def test_dependency_resolution_is_pinned_by_date() -> None:
    text = (REPO / "pyproject.toml").read_text()
    tool_uv = text[text.index("[tool.uv]") :]
    assert re.search(r'^exclude-newer = "\d{4}-\d{2}-\d{2}T', tool_uv, re.MULTILINE)
    assert "uv run --group dev pytest\n" in (REPO / ".ci" / "run").read_text()  # everything, in CI


def test_test_file_names_are_unique() -> None:
    # tests/ has no __init__.py files: two test files of one name cannot be collected together.
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_heavy_tests_are_slow_too() -> None:
    """`heavy` narrows `slow`: `-m "not slow"` must leave every heavy test out as well."""
    unmarked = []
    for path in sorted(TESTS.rglob("test_*.py")):
        source = path.read_text()
        if "mark.heavy" not in source or re.search(r"^pytestmark = .*mark\.slow", source, re.M):
            continue
        for node in ast.walk(ast.parse(source)):
            decorators = [ast.get_source_segment(source, d) or "" for d in
                          getattr(node, "decorator_list", [])]  # fmt: skip
            if any("mark.heavy" in d for d in decorators) and not _decorated_slow(node, source):
                unmarked.append(f"{path.relative_to(REPO)}::{getattr(node, 'name', '?')}")
    assert unmarked == []


def test_workers_share_the_cores_and_the_gpu_tier_runs_serially() -> None:
    from types import SimpleNamespace

    from tests.conftest import pytest_xdist_auto_num_workers as workers

    def count(markexpr: str) -> int:
        return workers(SimpleNamespace(option=SimpleNamespace(markexpr=markexpr)))

    assert count("gpu") == 0  # `uv run --group dev pytest -m gpu tests/gpu`: one device, in turn
    assert 1 <= count("not heavy") <= 8 and count("not gpu") == count("")
    assert "-n auto --dist loadfile" in (REPO / "pyproject.toml").read_text()
