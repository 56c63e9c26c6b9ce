"""`logger.num_val_samples_to_print`: greedy samples at each validation, printed, written to
val_samples.jsonl and TensorBoard; a sharded run takes part on every rank without hanging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLES = ("logger.num_val_samples_to_print=2", "logger.val_sample_max_new_tokens=4")


def records(exp_dir: Path) -> list[dict]:
    lines = (exp_dir / "val_samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_samples_at_each_validation(small_run, tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    capsys.readouterr()
    result = small_run.inprocess(
        tmp_path, *SAMPLES, "sft.max_num_steps=4", "sft.val_period=2",
        "logger.tensorboard_enabled=true",
    )  # fmt: skip
    assert result.returncode == 0
    got = records(result.exp_dir)
    assert [r["step"] for r in got] == [2, 2, 4, 4]
    assert {tuple(sorted(r)) for r in got} == {("generated", "prompt", "reference", "step")}
    # The same prompts (the first validation rows, e.g. "12+34") each time, with references.
    first = [json.loads(line) for line in small_run.validation.read_text().splitlines()[:2]]
    for k, row in enumerate(first):
        for record in (got[k], got[k + 2]):
            assert row["input"] in record["prompt"] and record["reference"] == row["output"]
            assert isinstance(record["generated"], str)
    assert capsys.readouterr().err.count("val sample 1/2 at step") == 2
    events = EventAccumulator(str(result.exp_dir / "tensorboard"))
    events.Reload()
    assert "val_samples/text_summary" in events.Tags()["tensors"]


def test_no_samples_by_default(small_run, tmp_path: Path) -> None:
    result = small_run.inprocess(tmp_path, "sft.max_num_steps=2", "sft.val_period=2")
    assert result.returncode == 0
    assert not (result.exp_dir / "val_samples.jsonl").exists()


@pytest.mark.heavy  # minutes of CPU on 2 cores: `uv run --group dev pytest -m heavy`
@pytest.mark.slow  # two processes
def test_two_sharded_ranks_both_generate_and_finish(small_run, tmp_path: Path) -> None:
    result = small_run.subprocess(
        tmp_path, *SAMPLES, "sft.max_num_steps=2", "sft.val_period=2", "policy.train_micro_batch_size=4",
        "cluster.gpus_per_node=2", timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in records(result.exp_dir)] == [2, 2]
