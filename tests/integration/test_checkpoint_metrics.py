"""Metrics a run logs (NeMo RL names) and where they go: metrics.jsonl, TensorBoard, MLflow."""

from __future__ import annotations

import pytest

NEMO_TRAIN = (
    "train/loss", "train/grad_norm", "train/lr", "train/global_valid_seqs",
    "train/global_valid_toks", "train/num_unmasked_tokens", "train/num_valid_samples",
    "timing/train/total_step_time", "timing/train/data_processing",
    "timing/train/policy_training", "timing/train/valid_tokens_per_sec_per_gpu",
)  # fmt: skip


def test_full_nemo_rl_metric_set_every_step(reference_run) -> None:
    rows = reference_run.metrics
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 15))
    for row in train:
        missing = [name for name in NEMO_TRAIN if name not in row]
        assert missing == [], (row["step"], missing)
        assert row["train/global_valid_seqs"] == row["train/num_valid_samples"] == 16
        assert row["train/global_valid_toks"] == row["train/num_unmasked_tokens"] > 0
        per_gpu = row["train/global_valid_toks"] / row["timing/train/total_step_time"]
        assert row["timing/train/valid_tokens_per_sec_per_gpu"] == pytest.approx(per_gpu)
    val = [r for r in rows if "validation/val_loss" in r]
    assert [r["step"] for r in val] == [7, 14]
    assert all("timing/validation/total_validation_time" in r for r in val)
    assert sum("timing/train/checkpointing" in r for r in rows) == 14


@pytest.mark.slow
def test_tensorboard_and_local_mlflow_receive_the_same_values(preempted_run, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jsonl = {s: r["train/loss"] for s, r in preempted_run.train_rows().items()}
    events = EventAccumulator(str(preempted_run.exp_dir / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb == pytest.approx(jsonl, rel=1e-6)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as sftkit sets for its local store
    store = preempted_run.exp_dir / "mlflow"
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(jsonl, rel=1e-12)
    assert run.data.params["policy.train_global_batch_size"] == "16"
