"""The README's launch table runs as written: the CPU rows train (shortened by overrides
appended to the command), the GPU and Slurm rows resolve with --print-config and pass the
layout check for their number of ranks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import one_example_data, read_metrics

REPO = Path(__file__).resolve().parents[2]
ROWS = re.findall(
    r"^\| [^|]+ \| `((?:uv run|torchrun|sbatch|GPUS_PER_NODE)[^`]*)` \|$",
    (REPO / "README.md").read_text(),
    flags=re.M,
)
ROWS = [row for row in ROWS if "--config examples/" in row]  # not the placeholder rows
CPU = [row for row in ROWS if "cluster.device=cpu" in row]
GPU = [row for row in ROWS if "cluster.device=cpu" not in row]


def argv(row: str) -> tuple[list[str], int]:
    """The row as a Python command line, and its number of ranks."""
    words = shlex.split(row)
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S+", w))
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S+", w)]
    ranks = 1
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


@pytest.mark.slow  # two training processes each
# the torchrun row in the default run (the command that once failed), the others heavy
@pytest.mark.parametrize(
    "row", [r if "torchrun" in r else pytest.param(r, marks=pytest.mark.heavy) for r in CPU]
)
def test_cpu_rows_train(row: str, sftkit_home: Path, tmp_path: Path) -> None:
    words, _ = argv(row)
    short = [
        "sft.max_num_steps=2", "sft.val_at_start=false", "sft.val_period=0",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}", f"logger.log_dir={tmp_path / 'logs'}",
        f"data.cache_dir={tmp_path / 'cache'}", "logger.tensorboard_enabled=false",
    ]  # fmt: skip
    env = {**os.environ, "SFTKIT_HOME": str(sftkit_home), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*words, *short], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [exp] = sorted((tmp_path / "logs").glob("exp_*"))
    assert [r["step"] for r in read_metrics(exp) if "train/loss" in r] == [1, 2]
    assert (tmp_path / "ckpt" / "final_hf" / "config.json").is_file()
