"""Context parallelism on CPU (gloo): each sequence split over C ranks gives the same
per-step loss and final weights as one process, padded and packed, and its checkpoint
resumes on another CP size. Tiny runs (the small model, 4 steps) to keep them fast."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, RunResult, SmallRun, finished
from test_distributed import COMMON, assert_same_losses, assert_same_weights

pytestmark = pytest.mark.slow

STEPS = 4
SHORT = ("checkpointing.save_period=0", f"sft.max_num_steps={STEPS}", "sft.val_period=2")
PACKED = ("policy.sequence_packing.enabled=true", "policy.sequence_packing.train_mb_tokens=128")


def run(small_run: SmallRun, work: Path, ranks: int, *more: str) -> RunResult:
    if ranks == 1:
        result = small_run.inprocess(work, *COMMON, *SHORT, *more)
        assert result.returncode == 0
        return result
    launch = (f"cluster.gpus_per_node={ranks}",)
    result = small_run.subprocess(work, *COMMON, *SHORT, *launch, *more, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_run(one: RunResult, other: RunResult) -> None:
    assert_same_losses(one, other, list(range(1, STEPS + 1)))
    for step, value in one.val_rows().items():
        assert abs(other.val_rows()[step] - value) <= 1e-5 * value
    assert_same_weights(one.checkpoint_dir / "final_hf", other.checkpoint_dir / "final_hf")


@pytest.mark.parametrize(
    "layout", [pytest.param(x, marks=pytest.mark.heavy) for x in ("padded", "packed")]
)
def test_cp2_matches_one_rank(small_run: SmallRun, tmp_path: Path, layout: str) -> None:
    more = PACKED if layout == "packed" else ()
    one = run(small_run, tmp_path / "one", 1, *more)
    cp = run(small_run, tmp_path / "cp2", 2, "policy.dtensor_cfg.context_parallel_size=2", *more)
    assert_same_run(one, cp)


@pytest.mark.heavy  # several ranks on 2 cores: minutes; `uv run --group dev pytest -m heavy`
def test_cp4_packed_and_resume_on_cp2(small_run: SmallRun, tmp_path: Path) -> None:
    """CP=4 (4 ranks, packed rows) matches one process; its step-2 checkpoint resumes with
    CP=2 x DP=1 and logs the same steps 3-4 (CP size changes like the DP size does)."""
    one = run(small_run, tmp_path / "one", 1, *PACKED)
    save = ("checkpointing.save_period=2",)
    cp4 = run(small_run, tmp_path / "cp4", 4, "policy.dtensor_cfg.context_parallel_size=4",
              *PACKED, *save)  # fmt: skip
    assert_same_run(one, cp4)
    work = tmp_path / "resume"
    shutil.copytree(cp4.work, work)
    for name in ("step_4", "final_hf"):
        shutil.rmtree(work / "ckpt" / name)
    resumed = run(small_run, work, 2, "policy.dtensor_cfg.context_parallel_size=2",
                  *PACKED, *save)  # fmt: skip
    assert "Resumed from" in resumed.stderr
    assert_same_losses(one, resumed, [3, 4])


YARN_RECIPE = "examples/configs/recipes/llm/sft-qwen3-0.6B-1n8g-megatron-yarn-128k.yaml"


def yarn_recipe(small_run: SmallRun, work: Path, ranks: int) -> RunResult:
    """NeMo RL's 128k YaRN recipe with the model and data swapped for offline ones, the
    lengths scaled down (CP 8 -> 2, 131072 -> 64 tokens per row) and float32 compute (bf16
    on CPU rounds differently per kernel, far above the 1e-5 compared here)."""

    swaps = (
        "policy.model_name=sftkit:tiny-llama", "policy.tokenizer.name=sftkit:tiny-llama",
        "data.train.dataset_name=ResponseDataset", "data.validation.dataset_name=ResponseDataset",
        "policy.max_total_sequence_length=64", "policy.megatron_cfg.context_parallel_size=2",
        "policy.precision=float32", "logger.wandb_enabled=false", "cluster.num_nodes=1", f"cluster.gpus_per_node={ranks}",
    )  # fmt: skip
    command = small_run.command(work, *COMMON, *SHORT, *swaps)
    command[command.index("--config") + 1] = str(REPO / YARN_RECIPE)  # not the quick start
    work.mkdir(parents=True)
    with (work / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(command, cwd=work, env=small_run.env(), stdout=err, stderr=err)
        code = proc.wait(timeout=400)
    (work / "stdout.txt").write_text("")
    result = finished(proc, work, set(), code)
    assert code == 0, result.stderr[-3000:]
    return result


@pytest.mark.heavy  # several ranks on 2 cores: minutes; `uv run --group dev pytest -m heavy`
def test_yarn_128k_recipe_runs_with_cp2_like_cp1(small_run: SmallRun, tmp_path: Path) -> None:
    from sftkit.config import load_config
    from sftkit.model.load import load_model

    cfg = load_config(REPO / YARN_RECIPE, ["policy.model_name=sftkit:tiny-llama"])
    assert cfg.policy.dtensor_cfg.context_parallel_size == 8  # megatron_cfg's spelling
    model = load_model(cfg.policy.model_name, param_dtype=torch.float32, trust_remote_code=False,
                       attn_implementation=None,
                       config_overrides=dict(cfg.policy.hf_config_overrides or {}))  # fmt: skip
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"]) == ("yarn", 3.2)
    assert model.model.rotary_emb.rope_type == "yarn"
    one = yarn_recipe(small_run, tmp_path / "one", 1)
    cp = yarn_recipe(small_run, tmp_path / "cp2", 2)
    assert "context_parallel_size=2: ignored with one process" in one.stderr
    assert_same_losses(one, cp, list(range(1, STEPS + 1)))
    saved = json.loads((cp.checkpoint_dir / "final_hf" / "config.json").read_text())
    saved_rope = saved.get("rope_parameters") or saved.get("rope_scaling")
    assert (saved_rope["rope_type"], saved_rope["factor"]) == ("yarn", 3.2)


@pytest.mark.heavy  # several ranks on 2 cores: minutes; `uv run --group dev pytest -m heavy`
def test_cp2_with_tp2_and_sequence_parallel_matches_one_rank(
    small_run: SmallRun, tmp_path: Path
) -> None:
    """4 ranks as TP=2 x CP=2 (sequence parallel inside each TP pair), packed rows."""
    one = run(small_run, tmp_path / "one", 1, *PACKED)
    layout = ("policy.dtensor_cfg.context_parallel_size=2", "policy.dtensor_cfg.tensor_parallel_size=2",
              "policy.dtensor_cfg.sequence_parallel=true")  # fmt: skip
    both = run(small_run, tmp_path / "tp_cp", 4, *layout, *PACKED)
    assert_same_run(one, both)
