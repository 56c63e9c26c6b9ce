"""Multi-process runs of the real entry point on CPU (gloo, 2 ranks): FSDP2, HSDP, tensor
parallel and LoRA give the same per-step loss as one process; sharded checkpoints resume
on a different rank count; export consolidates a sharded checkpoint into one HF directory.

Dropout is off and the data order is fixed by the seed, so every run sees the same
batches and the only differences are float reduction orders (relative 1e-5 allowed).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RunResult, SmallRun, dir_times, finished

from sftkit.checkpoint import layout as ckpt

STEPS = 6
RTOL = 1e-5
COMMON = (
    "++policy.hf_config_overrides.attention_dropout=0.0",
    "policy.train_micro_batch_size=4",
    f"sft.max_num_steps={STEPS}",
    "sft.val_period=3",
    "checkpointing.save_period=3",
)
LORA = ("policy.dtensor_cfg.lora_cfg.enabled=true", "policy.optimizer.kwargs.lr=0.01")


def one_rank(small_run: SmallRun, work: Path, *more: str) -> RunResult:
    result = small_run.inprocess(work, *COMMON, *more)
    assert result.returncode == 0
    return result


def two_ranks(small_run: SmallRun, work: Path, *more: str) -> RunResult:
    """Self-launched: `cluster.gpus_per_node=2` starts two ranks with torch elastic."""
    result = small_run.subprocess(work, *COMMON, "cluster.gpus_per_node=2", *more, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_two_tasks(small_run: SmallRun, work: Path, *more: str) -> RunResult:
    """Two tasks as `srun --ntasks=2` starts them: only SLURM_* variables, no RANK."""
    work.mkdir(parents=True, exist_ok=True)
    before = dir_times(work / "logs")
    port = str(free_port())
    procs = []
    for task in range(2):
        env = small_run.env(
            SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NTASKS="2",
            SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=port,
        )  # fmt: skip
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        out = (work / f"stderr_{task}.txt").open("w")
        cmd = small_run.command(work, *COMMON, *more)
        procs.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=out))
    codes = [p.wait(timeout=240) for p in procs]
    shutil.copy(work / "stderr_0.txt", work / "stderr.txt")
    (work / "stdout.txt").write_text("")
    result = finished(procs[0], work, before, codes[0])
    assert codes == [0, 0], (work / "stderr_0.txt").read_text()[-3000:]
    return result


def assert_same_losses(a: RunResult, b: RunResult, steps: list[int]) -> None:
    rows_a, rows_b = a.train_rows(), b.train_rows()
    assert sorted(rows_b) == steps
    for step in steps:
        la, lb = rows_a[step]["train/loss"], rows_b[step]["train/loss"]
        assert abs(la - lb) <= RTOL * abs(la), (step, la, lb)


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single(small_run: SmallRun, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return one_rank(small_run, tmp_path_factory.mktemp("one_rank"))


@pytest.fixture(scope="module")
def fsdp(small_run: SmallRun, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return two_ranks(small_run, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_rank(single: RunResult, fsdp: RunResult) -> None:
    assert_same_losses(single, fsdp, list(range(1, STEPS + 1)))
    assert fsdp.val_rows().keys() == single.val_rows().keys() == {3, 6}
    for step, value in single.val_rows().items():
        assert abs(fsdp.val_rows()[step] - value) <= RTOL * value
    step_3 = fsdp.checkpoint_dir / "step_3"
    assert sorted(p.name for p in (step_3 / "policy" / "dcp").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip
    assert (step_3 / "rng" / "rank_1.pt").exists()
    # final_hf gathered from the shards equals the one-process model
    assert_same_weights(single.checkpoint_dir / "final_hf", fsdp.checkpoint_dir / "final_hf")
    assert "LlamaForCausalLM" in (fsdp.checkpoint_dir / "final_hf" / "config.json").read_text()


@pytest.mark.slow
def test_export_consolidates_a_sharded_checkpoint(fsdp: RunResult, tmp_path: Path) -> None:
    from sftkit.checkpoint.export import export_checkpoint

    out = export_checkpoint(fsdp.checkpoint_dir / "step_6", tmp_path / "hf")
    assert_same_weights(out, fsdp.checkpoint_dir / "final_hf")


@pytest.mark.slow
def test_resume_sharded_checkpoint_on_one_rank(
    small_run: SmallRun, single: RunResult, fsdp: RunResult, tmp_path: Path
) -> None:
    """2 -> 1: the two-rank step_3 (DCP shards) continues in one process, same losses."""
    work = tmp_path / "resume"
    shutil.copytree(fsdp.work, work)
    shutil.rmtree(work / "ckpt" / "step_6")
    shutil.rmtree(work / "ckpt" / "final_hf")
    resumed = one_rank(small_run, work)
    assert_same_losses(single, resumed, [4, 5, 6])


@pytest.mark.slow
def test_async_saves_on_two_ranks_resume_exactly(
    small_run: SmallRun, single: RunResult, fsdp: RunResult, tmp_path: Path
) -> None:
    """`checkpointing.is_async` on two ranks (DCP's async_save, manifest hashed in the
    background): the same losses, step_3 written while steps 4-5 trained resumes them."""
    run = two_ranks(small_run, tmp_path / "async", "checkpointing.is_async=true")
    assert_same_losses(fsdp, run, list(range(1, STEPS + 1)))
    assert ckpt.verify(run.checkpoint_dir / "step_3") is None
    assert_same_weights(fsdp.checkpoint_dir / "final_hf", run.checkpoint_dir / "final_hf")
    work = tmp_path / "resume"
    shutil.copytree(run.work, work)
    shutil.rmtree(work / "ckpt" / "step_6")
    shutil.rmtree(work / "ckpt" / "final_hf")
    assert_same_losses(single, one_rank(small_run, work), [4, 5, 6])


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_resume_one_rank_checkpoint_on_two_srun_tasks(
    small_run: SmallRun, single: RunResult, tmp_path: Path
) -> None:
    """1 -> 2, joined from faked `srun` variables (SLURM_PROCID/NTASKS/LOCALID/NODELIST)."""
    work = tmp_path / "resume"
    shutil.copytree(single.work, work)
    shutil.rmtree(work / "ckpt" / "step_6")
    shutil.rmtree(work / "ckpt" / "final_hf")
    resumed = srun_two_tasks(small_run, work)
    assert "Resumed from" in resumed.stderr
    assert_same_losses(single, resumed, [4, 5, 6])


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_lora_under_fsdp2_matches_one_rank(small_run: SmallRun, tmp_path: Path) -> None:
    one = one_rank(small_run, tmp_path / "one", *LORA, "checkpointing.save_period=0")
    two = two_ranks(small_run, tmp_path / "two", *LORA, "checkpointing.save_period=0")
    assert_same_losses(one, two, list(range(1, STEPS + 1)))
    assert (two.checkpoint_dir / "final_adapter" / "adapter_model.safetensors").exists()
    assert_same_weights(one.checkpoint_dir / "final_adapter", two.checkpoint_dir / "final_adapter")
    assert_same_weights(one.checkpoint_dir / "final_hf", two.checkpoint_dir / "final_hf")


def torchrun_two(small_run: SmallRun, work: Path, *more: str) -> RunResult:
    """Two ranks under `torchrun --standalone --nproc-per-node=2`."""
    work.mkdir()
    before = dir_times(work / "logs")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        *small_run.command(work, *COMMON, *more)[1:],
    ]  # fmt: skip
    with (work / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=small_run.env(), stdout=err, stderr=err)
        code = proc.wait(timeout=240)
    (work / "stdout.txt").write_text("")
    result = finished(proc, work, before, code)
    assert code == 0, result.stderr[-3000:]
    return result


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_tensor_parallel_two_ranks_match_one_rank(
    small_run: SmallRun, single: RunResult, tmp_path: Path
) -> None:
    """TP=2 under torchrun (both ranks hold the same batch: one data-parallel rank)."""
    more = ("policy.dtensor_cfg.tensor_parallel_size=2", "checkpointing.save_period=0")
    result = torchrun_two(small_run, tmp_path / "tp", *more)
    assert_same_losses(single, result, list(range(1, STEPS + 1)))


@pytest.mark.slow
def test_sequence_parallel_lora_matches_one_rank(small_run: SmallRun, tmp_path: Path) -> None:
    """TP=2 + sequence_parallel + LoRA: the same loss, gradient norm and adapter as one
    process (torch's SequenceParallel used to make the frozen norms trainable)."""
    more = (*LORA, "checkpointing.save_period=0", "sft.max_num_steps=3", "sft.val_period=0",
            "policy.make_sequence_length_divisible_by=2")  # fmt: skip
    one = one_rank(small_run, tmp_path / "one", *more)
    sp = torchrun_two(small_run, tmp_path / "sp", *more, "policy.dtensor_cfg.tensor_parallel_size=2",
                      "policy.dtensor_cfg.sequence_parallel=true")  # fmt: skip
    assert_same_losses(one, sp, [1, 2, 3])
    for step, row in one.train_rows().items():
        norm = sp.train_rows()[step]["train/grad_norm"]
        assert abs(norm - row["train/grad_norm"]) <= RTOL * row["train/grad_norm"], step
    assert_same_weights(one.checkpoint_dir / "final_adapter", sp.checkpoint_dir / "final_adapter")


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow
def test_hsdp_two_replicas_match_one_rank(
    small_run: SmallRun, single: RunResult, tmp_path: Path
) -> None:
    """dp_replicate_size=2 on 2 ranks: a 2-D (replicate, shard) mesh, gradients all-reduced
    across the replicas; the same losses as one process and a checkpoint one rank resumes."""
    hsdp = two_ranks(small_run, tmp_path / "hsdp", "policy.dtensor_cfg.dp_replicate_size=2")
    assert_same_losses(single, hsdp, list(range(1, STEPS + 1)))
    assert_same_weights(single.checkpoint_dir / "final_hf", hsdp.checkpoint_dir / "final_hf")


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (
            "dp_replicate_size=4",
            "dp_replicate_size=4 needs a multiple of 4 ranks but this run has 2",
        ),
        ("context_parallel_size=4", "context_parallel_size=4 x dp_replicate_size=1 needs"),
    ],
)
def test_layout_the_ranks_cannot_hold_is_a_config_error(
    small_run: SmallRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str, message: str
) -> None:
    more = ("cluster.gpus_per_node=2", f"policy.dtensor_cfg.{size}")
    assert small_run.inprocess(tmp_path, *COMMON, *more).returncode == 2  # before any fork
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last
