"""Launcher environments without launching: srun's SLURM_* variables, self-launch
decisions, the Slurm batch script (run with stub `srun`/`scontrol`), mesh-aware gradient
clipping, and the tiny CPU mode of bench/gpu_fsdp.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftkit.config import MasterConfig, load_config
from sftkit.dist import apply_slurm_env, clip_grad_norm, first_slurm_host, in_launcher
from sftkit.lifecycle.launch import maybe_self_launch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu[03-05,9]", "gpu03"), ("node7", "node7"), ("a[1],b2", "a1"), ("x-1,x-2", "x-1")],
)
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_srun_tasks_become_torch_ranks() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "1234567"}  # fmt: skip
    assert in_launcher(env) and apply_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu12" and env["MASTER_PORT"] == str(29500 + 4567)


def test_torchrun_inside_slurm_keeps_torchrun_ranks() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "16", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert in_launcher(env) and not apply_slurm_env(env)
    assert env["RANK"] == "3"


def test_single_task_allocation_is_not_a_launcher() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
    assert not in_launcher(env) and not apply_slurm_env(env) and "RANK" not in env


def cfg(gpus: int, nodes: int = 1) -> MasterConfig:
    return load_config(None, [f"cluster.gpus_per_node={gpus}", f"cluster.num_nodes={nodes}",
                              "cluster.device=cpu"])  # fmt: skip


def test_self_launch_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert maybe_self_launch(cfg(1), []) is None  # one rank: run here
    with pytest.raises(ValueError, match="one launcher per node"):
        maybe_self_launch(cfg(2, nodes=2), [])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert maybe_self_launch(cfg(2), []) is None  # under torchrun: join


@pytest.mark.slow
def test_sbatch_starts_one_torchrun_per_node(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'gpu07\\ngpu08\\n'\n")
    (stubs / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun_args\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "99",
        "GPUS_PER_NODE": "4",
    }
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "slurm" / "sft.sbatch"), "--config", "x.yaml", "a.b=1"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--ntasks-per-node=1" in args and "torchrun" in args
    for expected in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-endpoint=gpu07:29500",
                     "--rdzv-id=99", "--config", "x.yaml", "a.b=1", "cluster.num_nodes=2",
                     "cluster.gpus_per_node=4"):  # fmt: skip
        assert expected in args, (expected, args)


def test_clip_grad_norm_equals_torch_on_one_mesh() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params]
    total = clip_grad_norm(params, 0.5)
    expected = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in reference])
    )
    torch.testing.assert_close(total, expected)
    for p, g in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, g * 0.5 / (expected + 1e-6))


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_gpu_fsdp_bench_tiny_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_fsdp.py"), "--tiny"],
        env=env, capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "fsdp.jsonl").read_text().splitlines()]
    assert [r["activation_checkpointing"] for r in rows] == [False, True]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0 and row["ok"], row
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-4)


def test_self_launch_without_gpus_asks_before_forking_cpu_ranks(monkeypatch) -> None:
    """`cluster.gpus_per_node=8` on a machine without GPUs fails with the two ways out."""
    import pytest

    from sftkit.config import load_config
    from sftkit.lifecycle import launch

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "_elastic_run", lambda nproc, argv: pytest.fail("forked"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = load_config(None, ["cluster.gpus_per_node=8"])
    with pytest.raises(ValueError, match="cluster.gpus_per_node=1.*cluster.device=cpu"):
        launch.maybe_self_launch(cfg, [])
