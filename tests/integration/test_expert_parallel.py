"""Expert parallelism through the real entry point on CPU (gloo): EP=2 on 2 ranks and
EP=2 x FSDP=2 on 4 give one process's per-step loss, gradient norm, validation loss and
final weights (float summation order apart: 1e-5 relative), padded and packed; an EP=2
checkpoint resumes on one process and a one-process checkpoint at EP=2; export gathers
the experts into transformers' layout; a dense model with EP > 1 says EP has nothing to
shard and trains.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import RunResult, SmallRun
from moe_model import write_tiny_qwen3_moe
from test_distributed import RTOL, STEPS, assert_same_weights

COMMON = (
    "++policy.hf_config_overrides.attention_dropout=0.0",
    "policy.train_micro_batch_size=4",
    f"sft.max_num_steps={STEPS}",
    "sft.val_period=3",
    "checkpointing.save_period=3",
)
EP2 = "policy.dtensor_cfg.expert_parallel_size=2"
PACKED = "policy.sequence_packing.enabled=true"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE (4 experts, top-2) with the built-in tokenizer."""
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe_ep"))


def run(small_run: SmallRun, work: Path, model: Path, ranks: int, *more: str) -> RunResult:
    args = (*COMMON, f"policy.model_name={model}", *more)
    if ranks == 1:
        result = small_run.inprocess(work, *args)
    else:
        result = small_run.subprocess(work, *args, f"cluster.gpus_per_node={ranks}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_steps(a: RunResult, b: RunResult, steps: list[int]) -> None:
    rows_a, rows_b = a.train_rows(), b.train_rows()
    assert sorted(rows_b) == steps
    for step in steps:
        for key in ("train/loss", "train/grad_norm"):
            va, vb = rows_a[step][key], rows_b[step][key]
            assert abs(va - vb) <= RTOL * abs(va), (step, key, va, vb)


def assert_same_run(one: RunResult, other: RunResult) -> None:
    assert_same_steps(one, other, list(range(1, STEPS + 1)))
    for step, value in one.val_rows().items():
        assert abs(other.val_rows()[step] - value) <= RTOL * value
    assert_same_weights(one.checkpoint_dir / "final_hf", other.checkpoint_dir / "final_hf")


@pytest.fixture(scope="module")
def single(
    small_run: SmallRun, moe_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> RunResult:
    return run(small_run, tmp_path_factory.mktemp("one"), moe_dir, 1)


@pytest.fixture(scope="module")
def ep2(small_run: SmallRun, moe_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return run(small_run, tmp_path_factory.mktemp("ep2"), moe_dir, 2, EP2)


@pytest.mark.slow
def test_ep2_matches_one_rank_and_exports_transformers_layout(
    single: RunResult, ep2: RunResult, moe_dir: Path
) -> None:
    assert "Expert parallel: 2 ranks split the experts" in ep2.stderr
    assert_same_run(single, ep2)
    # final_hf holds every expert in transformers' fused layout, loadable by transformers
    weights = transformers.AutoModelForCausalLM.from_pretrained(ep2.checkpoint_dir / "final_hf")
    experts = weights.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 48, 32)
    assert tuple(experts.down_proj.shape) == (4, 32, 24)


@pytest.mark.slow
def test_ep2_checkpoint_resumes_on_one_rank(
    small_run: SmallRun, single: RunResult, ep2: RunResult, moe_dir: Path, tmp_path: Path
) -> None:
    """EP=2 -> one process: the DCP shards of the split experts reshard to whole tensors."""
    work = tmp_path / "resume"
    shutil.copytree(ep2.work, work)
    shutil.rmtree(work / "ckpt" / "step_6")
    shutil.rmtree(work / "ckpt" / "final_hf")
    resumed = run(small_run, work, moe_dir, 1)
    assert_same_steps(single, resumed, [4, 5, 6])


@pytest.mark.slow
def test_ep2_packed_matches_one_rank(small_run: SmallRun, moe_dir: Path, tmp_path: Path) -> None:
    """Packed rows, and activation checkpointing on the EP side: the recomputed forward in
    backward runs the all-to-alls again, in the same order on every rank."""
    more = (PACKED, "checkpointing.save_period=0")
    one = run(small_run, tmp_path / "one", moe_dir, 1, *more)
    two = run(small_run, tmp_path / "two", moe_dir, 2, EP2, *more,
              "policy.dtensor_cfg.activation_checkpointing=true")  # fmt: skip
    assert_same_run(one, two)


@pytest.mark.heavy  # 4 ranks on 2 cores: minutes
@pytest.mark.slow
def test_ep2_by_fsdp2_matches_one_rank_and_resumes_from_it(
    small_run: SmallRun, single: RunResult, moe_dir: Path, tmp_path: Path
) -> None:
    """4 ranks, EP=2 x efsdp=2 (experts split over "ep", then FSDP2-sharded), padded and
    packed; and one process's step_3 continues at EP=2 x FSDP=2."""
    four = run(small_run, tmp_path / "four", moe_dir, 4, EP2)
    assert_same_run(single, four)
    more = (PACKED, "checkpointing.save_period=0")
    one = run(small_run, tmp_path / "one_packed", moe_dir, 1, *more)
    assert_same_run(one, run(small_run, tmp_path / "four_packed", moe_dir, 4, EP2, *more))
    work = tmp_path / "resume"
    shutil.copytree(single.work, work)
    shutil.rmtree(work / "ckpt" / "step_6")
    shutil.rmtree(work / "ckpt" / "final_hf")
    resumed = run(small_run, work, moe_dir, 4, EP2)
    assert "Resumed from" in resumed.stderr
    assert_same_steps(single, resumed, [4, 5, 6])


@pytest.mark.slow
def test_dense_model_with_ep_says_there_is_nothing_to_shard(
    small_run: SmallRun, tmp_path: Path
) -> None:
    result = small_run.subprocess(tmp_path, *COMMON, "sft.max_num_steps=1", EP2,
                                  "cluster.gpus_per_node=2", "checkpointing.enabled=false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "this model has no experts, so EP has nothing to shard" in result.stderr


@pytest.mark.slow
def test_lora_on_experts_under_ep2_matches_one_rank(
    small_run: SmallRun, moe_dir: Path, tmp_path: Path
) -> None:
    """Expert adapters split over the EP ranks with their experts (each rank forms
    W + s B@A for its own experts): the same steps, adapter and merged model as one rank."""
    from safetensors.torch import load_file
    from test_moe_run import EXPERT_LORA

    more = (*EXPERT_LORA, "policy.optimizer.kwargs.lr=0.01")
    one = run(small_run, tmp_path / "one", moe_dir, 1, *more)
    two = run(small_run, tmp_path / "two", moe_dir, 2, EP2, *more)
    assert "Expert parallel: 2 ranks split the experts" in two.stderr
    assert_same_steps(one, two, [1, 2, 3, 4])  # EXPERT_LORA: 4 steps
    a = load_file(one.checkpoint_dir / "final_adapter" / "adapter_model.safetensors")
    b = load_file(two.checkpoint_dir / "final_adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and any("experts" in k for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    assert_same_weights(one.checkpoint_dir / "final_hf", two.checkpoint_dir / "final_hf")
