"""NeMo RL's math recipes train with their prompt file, where NeMo RL's main reads it.

The two recipes that sftkit once shipped from older NeMo RL commits with `prompt_file`
beside `data.train` (where NeMo RL's main no longer reads it) now set it in `data.default`,
as NeMo RL's files at 7ea279ab do. Their first example, processed as training processes
it (`preview_records`), carries sftkit's math prompt asking for a `\\boxed{}` answer, and
only the solution is trained. Model and data are swapped for the tiny built-in tokenizer and
a local OpenMathInstruct-2 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkit.config import load_config
from sftkit.data.preview import preview_records
from sftkit.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "examples" / "configs" / "recipes" / "llm"
PROMPT = (REPO / "examples" / "prompts" / "math.txt").read_text()


@pytest.mark.parametrize(
    "recipe",
    ["sft-llama3.2-1b-1n8g-fsdp2tp1.v3.yaml", "sft-qwen2.5-32b-4n8g-fsdp2tp8sp-actckpt.v3.yaml"],
)
def test_math_recipe_renders_its_prompt(recipe: str, sftkit_home: Path, tmp_path: Path) -> None:
    rows = [{"problem": f"What is {n}+1?", "generated_solution": f"\\boxed{{{n + 1}}}"}
            for n in range(40)]  # fmt: skip
    data = tmp_path / "omi.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(
        RECIPES / recipe,
        [
            "policy.model_name=sftkit:tiny-llama",
            "policy.tokenizer.name=sftkit:tiny-llama",
            f"data.train.data_path={data}",
        ],
    )
    assert cfg.data.default and cfg.data.default["prompt_file"] == "examples/prompts/math.txt"
    tokenizer = load_tokenizer(cfg.policy)
    (record,) = preview_records(cfg, tokenizer, "train", 1)
    ids, mask = record["input_ids"], record["loss_mask"]
    text = tokenizer.decode(ids)
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    n = int(trained.strip().removeprefix("\\boxed{").split("}")[0]) - 1
    # NeMo RL's base template (these recipes keep it): " Question: <prompt> Answer: <solution>"
    assert f" Question: {PROMPT.format(f'What is {n}+1?').strip()} Answer:" in text, text
    assert "inside \\boxed{}." in text
    assert trained.strip() == f"\\boxed{{{n + 1}}}{tokenizer.eos_token}"  # add_eos: true
