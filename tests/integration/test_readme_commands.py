"""The README's commands run as written: the quick start, then the CPU rows of the launch
tables in order, in one working directory as a user types them (shortened by overrides
appended to each command), each training its own steps; the GPU and Slurm rows resolve with
--print-config and pass the layout check for their number of ranks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import dir_times, one_example_data, read_metrics, run_dirs

REPO = Path(__file__).resolve().parents[2]
ROWS = re.findall(
    r"^\| [^|]+ \| `((?:uv run|torchrun|sbatch|GPUS_PER_NODE)[^`]*)` \|$",
    (REPO / "README.md").read_text(),
    flags=re.M,
)
ROWS = [row for row in ROWS if "--config examples/" in row]  # not the placeholder rows
CPU = [row for row in ROWS if "cluster.device=cpu" in row]
GPU = [row for row in ROWS if "cluster.device=cpu" not in row]
# The quick start's training command: the first line of the README's first code block.
QUICK_START = re.findall(r"^```bash\n(uv run [^#\n]*?)\s*(?:#[^\n]*)?$",
                         (REPO / "README.md").read_text(), flags=re.M)[0]  # fmt: skip


def argv(row: str) -> tuple[list[str], int]:
    """The row as a Python command line, and its number of ranks."""
    words = shlex.split(row)
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S+", w))
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S+", w)]
    ranks = 1
    if words[:3] == ["uv", "run", "torchrun"]:  # torchrun from the project's environment
        words = words[2:]
    if words[:2] == ["uv", "run"]:
        words = [sys.executable, *words[2:]]
    elif words[0] == "torchrun":
        ranks = int(words[words.index("--nproc-per-node") + 1])
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "sbatch":
        nodes = int(next(w for w in words if w.startswith("--nodes=")).split("=")[1])
        gpus = next((w.split("=")[1] for w in words if w.startswith("--gpus-per-node=")), None)
        ranks = nodes * int(gpus or env.get("GPUS_PER_NODE", "8"))
        words = [sys.executable, "examples/run_sft.py", *words[words.index("--config") :]]
    for word in words:
        if word.startswith("cluster.gpus_per_node="):
            ranks = int(word.split("=")[1])
    return words, ranks


def test_the_table_has_cpu_gpu_and_slurm_rows() -> None:
    assert len(CPU) >= 2 and any("torchrun --nproc-per-node 2" in r for r in CPU)
    assert all("examples/configs/quickstart.yaml" in r for r in CPU)
    assert any(r.startswith("sbatch") for r in GPU) and len(GPU) >= 3


@pytest.mark.slow  # a --print-config process per row
@pytest.mark.parametrize("row", GPU)
def test_gpu_rows_resolve_and_fit_their_ranks(row: str) -> None:
    from sftkit.config import load_config
    from sftkit.dist import DistEnv
    from sftkit.train.recipe import check_before_model

    words, ranks = argv(row)
    config = words[words.index("--config") + 1]
    overrides = [w for w in words[words.index("--config") + 2 :] if "=" in w]
    script = [sys.executable, "examples/run_sft.py", "--config", config]  # one process
    out = subprocess.run(
        [*script, *overrides, "--print-config"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = load_config(REPO / config, overrides)
    check_before_model(cfg, DistEnv(world_size=ranks), one_example_data())


def test_every_cpu_command_has_its_own_checkpoint_dir() -> None:
    """A row that shares the quick start's `checkpoint_dir` resumes its last step and trains
    nothing (what the README once did): every command here writes a directory of its own."""
    from sftkit.config import load_config

    assert QUICK_START == "uv run examples/run_sft.py --config examples/configs/quickstart.yaml"
    dirs = []
    for row in [QUICK_START, *CPU]:
        words, _ = argv(row)
        config = words[words.index("--config") + 1]
        overrides = [w for w in words[words.index("--config") + 2 :] if "=" in w]
        dirs.append(load_config(REPO / config, overrides).checkpointing.checkpoint_dir)
    assert len(set(dirs)) == len(dirs), dirs


SHORT = ("sft.max_num_steps=2", "sft.val_at_start=false", "sft.val_period=0")


@pytest.mark.slow  # training processes: the quick start's, then two per row
# the quick start and the torchrun row in the default run (the command that once failed and
# the one that once resumed the quick start), every CPU row in order in the heavy one
@pytest.mark.parametrize(
    "rows", [[r for r in CPU if "torchrun" in r], pytest.param(CPU, marks=pytest.mark.heavy)],
    ids=["torchrun", "all"],
)  # fmt: skip
def test_cpu_rows_train_after_the_quick_start(
    rows: list[str], sftkit_home: Path, tmp_path: Path
) -> None:
    (tmp_path / "examples").symlink_to(REPO / "examples")  # the commands' relative paths
    short = [*SHORT, f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "SFTKIT_HOME": str(sftkit_home), "OMP_NUM_THREADS": "1"}
    for row in [QUICK_START, *rows]:
        before = dir_times(tmp_path / "logs")
        words, _ = argv(row)
        out = subprocess.run(
            [*words, *short], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, (row, out.stderr[-3000:])
        [exp] = run_dirs(tmp_path / "logs", before)
        assert [r["step"] for r in read_metrics(exp) if "train/loss" in r] == [1, 2], row
    assert len(list((tmp_path / "results").glob("*/final_hf/config.json"))) == 1 + len(rows)
