"""After training, one command: `run_eval.py` on the run's final_hf, a step_N checkpoint or
the LoRA adapter on its base, by path; score, generations and config saved; the score logged
to the run's metrics.jsonl and TensorBoard when given the run's log dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sftkit.cli import eval_main
from sftkit.eval.config import DEFAULT_EVAL_CONFIG, QUICKSTART_EVAL_CONFIG

pytestmark = pytest.mark.slow  # a training run and six evaluations
EVALS = DEFAULT_EVAL_CONFIG.parent


@pytest.fixture(scope="module")
def lora_run(small_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """2 LoRA steps with a checkpoint each: step_1, step_2, final_hf, final_adapter."""
    result = small_run.inprocess(
        tmp_path_factory.mktemp("eval_after_training"), "sft.max_num_steps=2",
        "policy.dtensor_cfg.lora_cfg.enabled=true", "logger.tensorboard_enabled=true",
    )  # fmt: skip
    assert result.returncode == 0
    return result


def run_eval(run: Any, data: Path, model: str, *more: str) -> int:
    return eval_main([
        "--config", str(QUICKSTART_EVAL_CONFIG), f"generation.model_name={run.checkpoint_dir / model}",
        f"data.data_path={data}", "data.max_samples=4", "generation.max_new_tokens=3",
        "generation.device=cpu", *more,
    ])  # fmt: skip


def eval_rows(exp_dir: Path) -> list[dict[str, Any]]:
    lines = (exp_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if any(k.startswith("eval/") for k in row)]


def test_final_hf_step_and_adapter_by_path(lora_run: Any, small_run: Any, tmp_path: Path) -> None:
    saved = {}
    for model in ("final_hf", "final_adapter", "step_2"):
        out = tmp_path / f"{model}.json"
        assert run_eval(lora_run, small_run.validation, model, f"eval.save_path={out}") == 0
        saved[model] = json.loads(out.read_text())
    for model, result in saved.items():
        assert result["num_samples"] == 4 and len(result["generations"]) == 4
        assert 0.0 <= result["score"] <= 1.0 and result["metric"] == "exact_match"
        config = result["config"]  # the resolved eval config travels with the score
        assert config["generation"]["model_name"].endswith(model)
        assert config["data"]["max_samples"] == 4
    # one trained model, three ways of pointing at it
    assert (
        len({json.dumps([g["generation"] for g in r["generations"]]) for r in saved.values()}) == 1
    )


def test_score_logged_to_the_runs_trackers(lora_run: Any, tmp_path: Path) -> None:
    """NeMo RL's eval.yaml on a step_N checkpoint (AIME 2024 from a local copy in its hub
    columns), then on final_hf, each logged to the run that trained them."""
    exp_dir = lora_run.exp_dir
    rows = [{"problem": f"{i}+{i}", "answer": str(2 * i), "id": i} for i in range(3)]
    aime = tmp_path / "aime_2024.jsonl"
    aime.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "step_1_eval"  # a directory, as NeMo RL's save_path
    nemo = ["--config", str(EVALS / "eval.yaml"), f"data.data_path={aime}",
            "generation.max_new_tokens=3", "generation.device=cpu"]  # fmt: skip
    model = lora_run.checkpoint_dir
    assert eval_main([*nemo, f"generation.model_name={model / 'step_1'}",
                      f"eval.save_path={out}", f"logger.log_dir={lora_run.log_dir}"]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["data"]["dataset_name"] == "AIME2024"
    score = json.loads((out / "evaluation_data.json").read_text())["score"]
    assert eval_main([*nemo, f"generation.model_name={model / 'final_hf'}",
                      f"logger.log_dir={exp_dir}"]) == 0  # fmt: skip
    logged = eval_rows(exp_dir)
    assert [r["step"] for r in logged] == [1, 2]  # step_1 at 1, final_hf at the run's last step
    assert logged[0]["eval/AIME2024/pass@1"] == score
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(exp_dir / "tensorboard"))
    events.Reload()
    assert "eval/AIME2024/pass@1" in events.Tags()["scalars"]


def test_log_dir_without_a_run_is_one_clear_error(
    lora_run: Any, small_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_eval(lora_run, small_run.validation, "final_hf", f"logger.log_dir={tmp_path}")
    assert code == 2
    assert "holds no training run (no metrics.jsonl, no exp_NNN)" in capsys.readouterr().err
