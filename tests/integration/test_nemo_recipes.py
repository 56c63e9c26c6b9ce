"""A NeMo RL base config plus recipes inheriting it run after swapping only model and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "tests" / "fixtures" / "nemo_configs" / "recipes" / "llm"


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("sft-llama3.1-8b-1n8g-fsdp2tp1-lora.yaml", []),
        # Megatron + packing recipe: its OpenMathInstruct-2 entry names its own output column
        # and math prompt, so those belong to "the data" being swapped.
        (
            "sft-llama3.1-8b-1n8g-megatron-seqpack.yaml",
            ["data.train.output_key=output", "data.default.prompt_file=null"],
        ),
    ],
)
def test_recipe_runs_with_swapped_model_and_data(
    recipe: str, extra: list[str], tmp_path: Path
) -> None:
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
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "run_sft.py"), "--config", str(RECIPES / recipe)]
        + swaps
        + extra,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_files = list((tmp_path / "logs").rglob("metrics.jsonl"))
    assert len(metrics_files) == 1
    rows = [json.loads(line) for line in metrics_files[0].read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert list((tmp_path / "results").rglob("final_hf/config.json"))
