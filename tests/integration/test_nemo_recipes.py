"""A NeMo RL base config plus recipes inheriting it run after swapping only model and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # recipe runs

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "tests" / "fixtures" / "nemo_configs" / "recipes"


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("llm/sft-llama3.1-8b-1n8g-fsdp2tp1-lora.yaml", []),
        # Megatron + packing recipe: its OpenMathInstruct-2 entry names its own output column,
        # which belongs to "the data" being swapped; its `examples/prompts/math.txt` (relative
        # to NeMo RL's checkout) is found in sftkit's, though the run's cwd is elsewhere.
        pytest.param(
            "llm/sft-llama3.1-8b-1n8g-megatron-seqpack.yaml",
            ["data.train.output_key=output", "policy.max_total_sequence_length=128"],
            marks=pytest.mark.heavy,
        ),
        # NeMo RL's newer `automodel_cfg` (LoRA, expert parallelism, Automodel kwargs)
        pytest.param("other_versions/sft-newer-automodel-lora.yaml", [], marks=pytest.mark.heavy),
        # NeMo RL's older standalone layout: flat data, bare metric name
        pytest.param("other_versions/sft-older-flat-standalone.yaml", [], marks=pytest.mark.heavy),
    ],
)
def test_recipe_runs_with_swapped_model_and_data(
    recipe: str, extra: list[str], tmp_path: Path
) -> None:
    result = _run(recipe, extra, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_files = list((tmp_path / "logs").rglob("metrics.jsonl"))
    assert len(metrics_files) == 1
    rows = [json.loads(line) for line in metrics_files[0].read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert list((tmp_path / "results").rglob("final_hf/config.json"))


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
def test_multi_gpu_layout_on_one_process_trains_unsharded_with_a_warning(
    tmp_path: Path,
) -> None:
    """A TP=4, CP=2, HSDP=2 recipe run on one process: the same model trains unsharded, and
    one warning names the ignored sizes and how to use them."""
    sizes = ("tensor_parallel_size=4", "context_parallel_size=2", "dp_replicate_size=2")
    result = _run(
        "other_versions/sft-newer-automodel-lora.yaml",
        [f"policy.automodel_cfg.{size}" for size in sizes],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warning = f"{', '.join(sizes)}: ignored with one process"
    assert result.stderr.count(warning) == 1 and "cluster.gpus_per_node" in result.stderr


def _run(recipe: str, extra: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `recipe` for 3 steps on CPU with only the model and the data swapped."""
    data = REPO / "examples" / "data"
    (tmp_path / "train.jsonl").write_text(
        "\n".join((data / "addition_train.jsonl").read_text().splitlines()[:64]) + "\n"
    )
    (tmp_path / "val.jsonl").write_text(
        "\n".join((data / "addition_validation.jsonl").read_text().splitlines()[:16]) + "\n"
    )
    swaps = [
        "policy.model_name=sftkit:tiny-llama",
        "policy.tokenizer.name=sftkit:tiny-llama",
        "data.train.dataset_name=ResponseDataset",
        f"data.train.data_path={tmp_path / 'train.jsonl'}",
        "data.validation.dataset_name=ResponseDataset",
        f"data.validation.data_path={tmp_path / 'val.jsonl'}",
        # sizes for a 2-core CPU
        "sft.max_num_steps=3",
        "policy.train_global_batch_size=8",
        "policy.train_micro_batch_size=4",
        "policy.max_total_sequence_length=64",
        "logger.wandb_enabled=false",
        "cluster.gpus_per_node=1",
        "cluster.num_nodes=1",
    ]
    env = {**os.environ, "SFTKIT_HOME": str(tmp_path / "home")}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "run_sft.py"), "--config", str(RECIPES / recipe)]
        + swaps
        + extra,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
