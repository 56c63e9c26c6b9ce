"""Shared fixtures: a built-in model home, a tiny dataset, and the real entry point as a helper.

    def test_x(small_run):                       # (SmallRun) tiny data + the built-in model
        result = small_run.inprocess(tmp_path, "sft.max_num_steps=3")
        assert result.returncode == 0 and result.train_rows()[3]["train/loss"] > 0
        proc = small_run.start(tmp_path)         # a real subprocess (Popen), same settings
        result = small_run.subprocess(tmp_path, "sft.max_num_steps=3")

The small run is 96 addition examples, global batch 16 (6 steps per epoch) in 2
micro-batches of 8, float32 on CPU with attention dropout 0.1 and shuffling, one torch
thread (so in-process and subprocess runs are bit-identical), checkpoints every step.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# The offline quick start: the tiny built-in model on the bundled addition task.
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"
TRAIN_ROWS, VAL_ROWS, GLOBAL_BATCH = 96, 16, 16
STEPS_PER_EPOCH = TRAIN_ROWS // GLOBAL_BATCH

if "PYTEST_XDIST_WORKER" in os.environ:
    # Workers share the cores: torch (imported later) and the runs a test starts get their
    # share of threads, not every core each (oversubscribed OpenMP spins instead of working).
    _share = (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, up to 8; serial for the CUDA tests."""
    if "gpu" in (config.option.markexpr or "") and "not gpu" not in config.option.markexpr:
        return 0  # one device: the CUDA tests take turns on it
    return min(os.cpu_count() or 1, 8)


def write_addition_data(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` lines of `{"input": "a+b", "output": "sum"}` (ResponseDataset JSONL)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            f.write(json.dumps({"input": f"{a}+{b}", "output": str(a + b)}) + "\n")
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is ~20x faster than several on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_example_data() -> Any:
    """A real `PreparedData` whose train and validation splits hold one 2-token example:
    enough for the checks made before the model loads, without tokenizing anything."""
    import numpy as np

    from sftkit.data.types import ExampleSet, PreparedData, Source

    one = ExampleSet(
        np.array([1, 2], dtype=np.int32), np.array([0, 1], dtype=np.uint8),
        np.array([2], dtype=np.int64), np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.uint8),
        ["t"], [Source("t", 0, 1)],
    )  # fmt: skip
    return PreparedData(train=one, validation=one)


def read_metrics(exp_dir: Path, since_resume: bool = False) -> list[dict[str, Any]]:
    """The rows of `exp_dir/metrics.jsonl`; with `since_resume`, only those after the last
    `{"resumed": true}` row (what the latest, resumed run logged into the directory)."""
    path = exp_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if since_resume:
        marks = [i for i, row in enumerate(rows) if row.get("resumed")]
        rows = rows[marks[-1] + 1 :] if marks else rows
    return rows


def run_dirs(log_dir: Path, before: dict[Path, float]) -> list[Path]:
    """The exp dirs a run wrote: new ones, or one it continued (its metrics.jsonl changed)."""
    return [p for p in exp_dirs(log_dir) if p not in before or _mtime(p) != before[p]]


def dir_times(log_dir: Path) -> dict[Path, float]:
    return {p: _mtime(p) for p in exp_dirs(log_dir)}


def _mtime(exp_dir: Path) -> float:
    path = exp_dir / "metrics.jsonl"
    return path.stat().st_mtime_ns if path.exists() else 0.0


def exp_dirs(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("exp_*")) if log_dir.is_dir() else []


@dataclass
class RunResult:
    """What one run of the entry point left: exit code, output and its new exp_NNN dirs."""

    returncode: int
    work: Path
    new_exp_dirs: list[Path]
    stdout: str = ""
    stderr: str = ""

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "ckpt"

    @property
    def log_dir(self) -> Path:
        return self.work / "logs"

    @property
    def exp_dir(self) -> Path:
        assert len(self.new_exp_dirs) == 1, self.new_exp_dirs
        return self.new_exp_dirs[0]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows this run logged (a resumed run continues the earlier run's exp_NNN)."""
        return read_metrics(self.exp_dir, since_resume=True)

    def train_rows(self) -> dict[int, dict[str, Any]]:
        """step -> the train/* metrics logged at that step (timings left out)."""
        return rows_by_step(self.metrics, "train/")

    def val_rows(self) -> dict[int, float]:
        return {
            r["step"]: r["validation/val_loss"] for r in self.metrics if "validation/val_loss" in r
        }


def rows_by_step(metrics: list[dict[str, Any]], prefix: str = "train/") -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in metrics:
        if "train/loss" in row:
            out[row["step"]] = {k: v for k, v in row.items() if k.startswith(prefix)}
    return out


@dataclass
class SmallRun:
    """The real `run_sft.py` entry point on the tiny dataset; results land in `work/`."""

    home: Path
    train: Path
    validation: Path
    cache: Path
    extra: list[str] = field(default_factory=list)

    def overrides(self, work: Path, *more: str) -> list[str]:
        base = [
            f"data.train.data_path={self.train}",
            f"data.validation.data_path={self.validation}",
            f"data.cache_dir={self.cache}",
            f"policy.train_global_batch_size={GLOBAL_BATCH}",
            "policy.train_micro_batch_size=8",
            "policy.max_total_sequence_length=32",
            "++policy.hf_config_overrides.attention_dropout=0.1",
            "sft.max_num_steps=14",
            "sft.val_period=7",
            "sft.val_at_start=false",
            "sft.val_batches=1",
            "sft.val_global_batch_size=16",
            "sft.val_micro_batch_size=16",
            f"checkpointing.checkpoint_dir={work / 'ckpt'}",
            "checkpointing.save_period=1",
            "checkpointing.keep_top_k=null",
            f"logger.log_dir={work / 'logs'}",
            "logger.tensorboard_enabled=false",
            "logger.monitor_gpus=false",
            "cluster.device=cpu",
        ]
        return base + self.extra + list(more)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "SFTKIT_HOME": str(self.home),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **extra,
        }

    def inprocess(self, work: Path, *more: str, env: dict[str, str] | None = None) -> RunResult:
        """`sft_main` in this process (no import cost), with one torch thread."""
        import torch

        from sftkit.cli import sft_main

        before = dir_times(work / "logs")
        threads = torch.get_num_threads()
        saved_env = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        torch.set_num_threads(1)
        _drop_sftkit_handlers()  # bind the run's log handler to this test's stderr
        try:
            code = sft_main(["--config", str(QUICKSTART), *self.overrides(work, *more)])
        finally:
            _drop_sftkit_handlers()
            torch.set_num_threads(threads)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return RunResult(code, work, run_dirs(work / "logs", before))

    def command(self, work: Path, *more: str) -> list[str]:
        script = str(REPO / "examples" / "run_sft.py")
        return [sys.executable, script, "--config", str(QUICKSTART), *self.overrides(work, *more)]

    def start(self, work: Path, *more: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """The entry point as a real process (stdout/stderr to work/stdout.txt, stderr.txt)."""
        work.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            self.command(work, *more),
            cwd=work,
            env=self.env(**(env or {})),
            stdout=(work / "stdout.txt").open("w"),
            stderr=(work / "stderr.txt").open("w"),
        )

    def subprocess(
        self, work: Path, *more: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> RunResult:
        before = dir_times(work / "logs")
        proc = self.start(work, *more, env=env)
        code = proc.wait(timeout=timeout)
        return finished(proc, work, before, code)


def _drop_sftkit_handlers() -> None:
    """Remove the stderr handler `setup_logging` adds: it holds the stream of the test that
    created it, which pytest closes afterwards."""
    import logging

    logger = logging.getLogger("sftkit")
    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_sftkit", False)]


def finished(proc: subprocess.Popen, work: Path, before: dict[Path, float], code: int) -> RunResult:
    new = run_dirs(work / "logs", before)
    return RunResult(
        code, work, new, (work / "stdout.txt").read_text(), (work / "stderr.txt").read_text()
    )


@pytest.fixture(scope="session")
def sftkit_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SFTKIT_HOME with the built-in `sftkit:tiny-llama` built once for the session."""
    home = tmp_path_factory.mktemp("sftkit_home")
    previous = os.environ.get("SFTKIT_HOME")
    os.environ["SFTKIT_HOME"] = str(home)
    from sftkit.model.builtin import resolve_model_path

    resolve_model_path("sftkit:tiny-llama")
    yield home
    if previous is None:
        os.environ.pop("SFTKIT_HOME", None)
    else:
        os.environ["SFTKIT_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(sftkit_home: Path) -> Path:
    """The built-in tiny Llama as a local HF directory (weights, config, tokenizer)."""
    return sftkit_home / "models" / "tiny-llama"


@pytest.fixture(scope="session")
def small_run(sftkit_home: Path, tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    data = tmp_path_factory.mktemp("small_data")
    return SmallRun(
        home=sftkit_home,
        train=write_addition_data(data / "train.jsonl", TRAIN_ROWS, seed=0),
        validation=write_addition_data(data / "validation.jsonl", VAL_ROWS, seed=1),
        cache=data / "cache",
    )


@pytest.fixture(scope="session")
def reference_run(small_run: SmallRun, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """An uninterrupted small run of 14 steps (2 epochs + 2) with a checkpoint at every step."""
    result = small_run.inprocess(tmp_path_factory.mktemp("reference"))
    assert result.returncode == 0
    assert sorted(result.train_rows()) == list(range(1, 15))
    return result


CANARY_ENV = {
    "WANDB_API_KEY": "canary-wandb-5e1f9c2a7b",
    "HF_TOKEN": "hf_canaryTokenQ8Zr4Lm2",
}


def wait_for_step(exp_parent: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll the run's metrics.jsonl until a train step >= `step` is logged; returns it."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for exp in exp_dirs(exp_parent):
            steps = [r["step"] for r in read_metrics(exp) if "train/loss" in r]
            if steps and max(steps) >= step:
                return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"the run exited with {proc.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="session")
def preempted_run(small_run: SmallRun, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The small run as a real process, sent SIGTERM once step 2 is logged.

    It also carries canary secrets (in the environment, and one inside a config value) and
    logs to TensorBoard and a local MLflow store, so one process serves the preemption,
    secret-hygiene and logger tests.
    """
    import signal

    work = tmp_path_factory.mktemp("preempted")
    proc = small_run.start(
        work,
        "logger.tensorboard_enabled=true",
        "logger.mlflow_enabled=true",
        f"logger.wandb.name=leak-{CANARY_ENV['HF_TOKEN']}",
        f"logger.mlflow.run_name=run-{CANARY_ENV['WANDB_API_KEY']}",
        env=CANARY_ENV,
    )
    wait_for_step(work / "logs", 2, proc)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    return finished(proc, work, {}, code)


# Triton 3.5/3.6's interpreters (torch 2.9-2.11) hand kernels their scalar arguments as 1-element
# numpy arrays and turn them into loop bounds with int(array), which numpy >= 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"). Interpreted scripts start
# by making that conversion take the element; newer interpreters are unaffected.
INTERPRETER_SHIM = """
import numpy as _np
import triton.runtime.interpreter as _interp

if hasattr(_interp, "_patch_lang_tensor"):
    _patch_tensor = _interp._patch_lang_tensor

    def _scalar_index(tensor, *scope):  # triton 3.6 passes a patch scope, 3.5 does not
        _patch_tensor(tensor, *scope)
        index = lambda self: int(_np.asarray(self.handle.data).reshape(-1)[0])
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    _interp._patch_lang_tensor = _scalar_index
"""


@pytest.fixture
def run_triton_interpreted() -> Any:
    """`run(script) -> stdout`: `script` in a fresh Python with TRITON_INTERPRET=1 (Triton
    kernels on CPU tensors; the variable must be set before triton is imported). The script
    must print "OK" once its checks pass."""
    pytest.importorskip("triton")

    def run(script: str) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", INTERPRETER_SHIM + script], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "OK" in proc.stdout
        return proc.stdout

    return run
