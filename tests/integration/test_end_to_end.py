"""The real entry points end to end on CPU: train, checkpoint, export, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the entry-point scripts as real processes

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"


def run(script: str, *args: str, cwd: Path, env_home: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "SFTKIT_HOME": str(env_home)}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def short_run(work: Path) -> tuple[str, ...]:
    """Overrides of the 40-step run on the data subset written under `work`."""
    data = work / "data"
    return (
        "--config",
        str(QUICKSTART),
        "sft.max_num_steps=40",
        "sft.val_period=20",
        "checkpointing.save_period=20",
        f"data.train.data_path={data / 'addition_train.jsonl'}",
        f"data.validation.data_path={data / 'addition_validation.jsonl'}",
        f"data.cache_dir={work / 'cache'}",
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short run of the embedded default config (40 steps, saves at 20 and 40)."""
    work = tmp_path_factory.mktemp("e2e")
    home = tmp_path_factory.mktemp("home")
    subset(work / "data")
    result = run("run_sft.py", *short_run(work), cwd=work, env_home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "home": home, "stderr": result.stderr}  # type: ignore[dict-item]


def subset(directory: Path) -> Path:
    """The bundled task cut to 640 train / 64 validation rows, to keep the test fast."""
    directory.mkdir(parents=True)
    for split, rows in (("train", 640), ("validation", 64)):
        lines = (REPO / "examples" / "data" / f"addition_{split}.jsonl").read_text().splitlines()
        (directory / f"addition_{split}.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    return directory


def metrics(work: Path, exp: str = "exp_001") -> list[dict]:
    lines = (work / "logs" / exp / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_default_run_trains_checkpoints_and_exports(trained: dict) -> None:
    work = trained["work"]
    rows = metrics(work)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0  # falling train/loss
    vals = [r for r in rows if "validation/val_loss" in r]
    assert [r["step"] for r in vals] == [0, 20, 40]
    for name in (
        "train/grad_norm", "train/lr", "train/global_valid_toks", "train/global_valid_seqs",
        "train/num_unmasked_tokens", "timing/train/total_step_time",
        "timing/train/valid_tokens_per_sec_per_gpu",
    ):  # fmt: skip
        assert name in rows[1], name
    ckpt = work / "results" / "quickstart"
    assert (ckpt / "step_20" / "manifest.json").exists()
    assert (ckpt / "step_40" / "training_info.json").exists()
    assert not list(ckpt.glob("tmp_step_*"))
    final = ckpt / "final_hf"
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    assert "im_start" in (final / "chat_template.jinja").read_text()
    assert "step 40/40" in trained["stderr"]


def test_eval_scores_the_final_model(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    data = REPO / "examples" / "data" / "addition_validation.jsonl"
    result = run(
        "run_eval.py",
        "--config",
        str(REPO / "examples" / "configs" / "evals" / "quickstart.yaml"),
        f"data.data_path={data}",
        "data.max_samples=32",
        f"eval.save_path={out}",
        cwd=trained["work"],
        env_home=trained["home"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["metric"] == "exact_match" and saved["num_samples"] == 32
    assert 0.0 <= saved["score"] <= 1.0
    assert len(saved["generations"]) == 32
    assert "exact_match" in result.stdout


def test_resume_continues_with_identical_losses(trained: dict, tmp_path: Path) -> None:
    """Stop after the step-20 checkpoint (delete step_40), start again: same losses 21-40."""
    import shutil

    work = tmp_path / "resume"
    shutil.copytree(trained["work"], work)
    shutil.rmtree(work / "results" / "quickstart" / "step_40")
    shutil.rmtree(work / "results" / "quickstart" / "final_hf")
    result = run("run_sft.py", *short_run(trained["work"]), cwd=work, env_home=trained["home"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    first = {r["step"]: r for r in metrics(trained["work"]) if "train/loss" in r}
    resumed = {r["step"]: r for r in metrics(work, "exp_002") if "train/loss" in r}
    assert sorted(resumed) == list(range(21, 41))
    for step, row in resumed.items():
        assert row["train/loss"] == first[step]["train/loss"], step
        assert row["train/lr"] == first[step]["train/lr"], step


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    result = run("run_sft.py", "sft.max_num_step=5", cwd=tmp_path, env_home=tmp_path)
    assert result.returncode == 2
    assert "max_num_steps" in result.stderr


def test_print_config_resolves_interpolations(tmp_path: Path) -> None:
    result = run("run_sft.py", "--config", str(QUICKSTART), "--print-config", "policy.train_micro_batch_size=8",
                 cwd=tmp_path, env_home=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "train_mb_tokens: 512" in result.stdout  # ${mul:64, 8}
