"""Bit-exact resume: stop at step k, start again, and every later step logs the same numbers.

The reference is one uninterrupted 14-step run (6 steps per epoch, shuffling on, attention
dropout 0.1, 2 micro-batches per step) that saved a checkpoint at every step. A resumed run
starts from a copy of one of those checkpoints alone.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from sftkit.checkpoint import layout as ckpt

EXACT = ("train/loss", "train/grad_norm", "train/lr", "train/global_valid_toks",
         "train/global_valid_seqs", "train/num_unmasked_tokens", "train/num_valid_samples")  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_from(reference, work: Path, step: int) -> None:
    """A checkpoint directory holding only the reference's step_<step>."""
    src = reference.checkpoint_dir / f"step_{step}"
    shutil.copytree(src, work / "ckpt" / src.name)


def assert_same_steps(resumed, reference, first: int) -> None:
    ref, got = reference.train_rows(), resumed.train_rows()
    assert sorted(got) == list(range(first, 15))
    for step in got:
        for name in EXACT:
            assert got[step][name] == ref[step][name], (
                step,
                name,
                got[step][name],
                ref[step][name],
            )
    ref_val = {s: v for s, v in reference.val_rows().items() if s >= first}
    assert resumed.val_rows() == ref_val


@pytest.mark.parametrize("k", [1, 3, 6, 13], ids=["k=1", "mid-epoch", "epoch-boundary", "last-1"])
def test_resume_is_bit_exact(reference_run, small_run, tmp_path: Path, k: int) -> None:
    start_from(reference_run, tmp_path, k)
    resumed = small_run.inprocess(tmp_path)
    assert resumed.returncode == 0
    assert_same_steps(resumed, reference_run, k + 1)
    weights = Path("policy/weights/model.safetensors")
    assert sha256(resumed.checkpoint_dir / "step_14" / weights) == sha256(
        reference_run.checkpoint_dir / "step_14" / weights
    )


def test_resume_without_rng_state_diverges(reference_run, small_run, tmp_path: Path) -> None:
    """The per-rank RNG file is what makes dropout resume exactly (control for the test above)."""
    start_from(reference_run, tmp_path, 3)
    step_dir = tmp_path / "ckpt" / "step_3"
    assert (step_dir / "rng" / "rank_0.pt").is_file()
    (step_dir / "rng" / "rank_0.pt").unlink()
    ckpt.write_manifest(step_dir)
    resumed = small_run.inprocess(tmp_path, "sft.max_num_steps=5")
    assert resumed.returncode == 0
    got, ref = resumed.train_rows(), reference_run.train_rows()
    assert got[4]["train/loss"] != ref[4]["train/loss"]


def test_rng_state_is_per_step_and_per_rank(reference_run) -> None:
    a = torch.load(reference_run.checkpoint_dir / "step_3" / "rng" / "rank_0.pt", weights_only=True)
    b = torch.load(reference_run.checkpoint_dir / "step_4" / "rng" / "rank_0.pt", weights_only=True)
    assert set(a) >= {"python", "numpy", "torch"}
    assert not torch.equal(a["torch"], b["torch"])  # dropout drew from the torch generator
    assert not list(reference_run.checkpoint_dir.glob("step_*/rng/rank_1.pt"))


def test_state_files_load_weights_only_without_allow_list(reference_run) -> None:
    step_dir = reference_run.checkpoint_dir / "step_6"
    files = sorted(step_dir.rglob("*.pt"))
    names = {str(p.relative_to(step_dir)) for p in files}
    assert names == {
        "train_dataloader.pt", "rng/rank_0.pt", "policy/optimizer/optimizer.pt",
        "policy/optimizer/scheduler.pt",
    }  # fmt: skip
    for path in files:
        # Globals outside torch's built-in weights-only set (a NumPy array would show here).
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        torch.load(path, weights_only=True)
    scheduler = torch.load(step_dir / "policy/optimizer/scheduler.pt", weights_only=True)
    assert len(scheduler["_schedulers"]) == 2  # the default warmup + cosine SequentialLR
    assert torch.load(step_dir / "train_dataloader.pt", weights_only=True) == {
        "epoch": 0,
        "position": 6,
    }
    info = ckpt.read_info(step_dir)
    assert (info["step"], info["consumed_samples"]) == (6, 96)


def test_micro_batch_size_may_change_on_resume(reference_run, small_run, tmp_path: Path) -> None:
    """Micro-batching cannot change loss or gradients, so it is not part of the fingerprint."""
    start_from(reference_run, tmp_path, 6)
    resumed = small_run.inprocess(
        tmp_path, "policy.train_micro_batch_size=4", "sft.max_num_steps=8",
        "++policy.hf_config_overrides.attention_dropout=0.0",
    )  # fmt: skip
    assert resumed.returncode == 0
    assert sorted(resumed.train_rows()) == [7, 8]


def test_fingerprint_mismatch_names_every_difference(
    reference_run, small_run, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    start_from(reference_run, tmp_path, 3)
    other_model = tmp_path / "same-weights-other-name"
    shutil.copytree(tiny_model_dir, other_model)
    capsys.readouterr()
    result = small_run.inprocess(
        tmp_path, f"policy.model_name={other_model}", "policy.train_global_batch_size=32"
    )
    err = capsys.readouterr().err
    assert result.returncode == 2
    assert "Cannot resume" in err and "model:" in err and "train_global_batch_size:" in err
    assert "checkpointing.resume=false" in err
    assert "Traceback" not in err
    assert (tmp_path / "ckpt" / "step_3").is_dir()  # nothing was moved or overwritten


def test_resume_false_starts_fresh_and_archives(reference_run, small_run, tmp_path: Path) -> None:
    start_from(reference_run, tmp_path, 3)
    result = small_run.inprocess(tmp_path, "checkpointing.resume=false", "sft.max_num_steps=2")
    assert result.returncode == 0
    ref = reference_run.train_rows()
    assert result.train_rows() == {s: ref[s] for s in (1, 2)}
    archived = list((tmp_path / "ckpt").glob("previous_*/step_3"))
    assert len(archived) == 1 and ckpt.verify(archived[0]) is None


def test_resume_mismatch_fresh_starts_over(reference_run, small_run, tmp_path: Path) -> None:
    start_from(reference_run, tmp_path, 3)
    result = small_run.inprocess(
        tmp_path, "checkpointing.resume_mismatch=fresh", "policy.max_total_sequence_length=48",
        "sft.max_num_steps=1",
    )  # fmt: skip
    assert result.returncode == 0
    assert sorted(result.train_rows()) == [1]
    assert list((tmp_path / "ckpt").glob("previous_*/step_3"))


def test_resume_with_the_fused_optimizer_is_bit_exact(
    small_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's fused AdamW (sftkit's choice on CUDA; here on CPU) clips inside its kernel and
    keeps its step counts as tensors: stopping at step 3 and resuming changes nothing."""
    from sftkit.train import step as step_module

    device_updates = []
    on_device = step_module._clip_and_update_on_device

    def counted(*args, **kwargs):
        device_updates.append(1)
        return on_device(*args, **kwargs)

    monkeypatch.setattr(step_module, "_clip_and_update_on_device", counted)
    fused = "policy.optimizer.kwargs.fused=true"
    whole = small_run.inprocess(tmp_path / "whole", fused, "sft.max_num_steps=6")
    part = small_run.inprocess(tmp_path / "part", fused, "sft.max_num_steps=3")
    resumed = small_run.inprocess(tmp_path / "part", fused, "sft.max_num_steps=6")
    assert whole.returncode == part.returncode == resumed.returncode == 0
    assert len(device_updates) == 6 + 3 + 3  # every step took the device-side update
    ref, got = whole.train_rows(), resumed.train_rows()
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert {n: got[step][n] for n in EXACT} == {n: ref[step][n] for n in EXACT}, step


def mixture_overrides(small_run, data: Path) -> list[str]:
    """Two training sets mixed 3:1 (40 + 24 examples: 4 steps per epoch) and two named
    validation sets, ranked by one of them."""
    from tests.conftest import write_addition_data

    easy = write_addition_data(data / "easy.jsonl", 40, seed=2)
    hard = write_addition_data(data / "hard.jsonl", 24, seed=3)
    return [
        f"data.train=[{{data_path: '{easy}', weight: 3}}, {{data_path: '{hard}', weight: 1}}]",
        f"data.validation=[{{data_path: '{small_run.validation}', name: held}}, "
        f"{{data_path: '{hard}', name: hard_val}}]",
        "checkpointing.metric_name=val:held/val_loss",
        "sft.max_num_steps=9",
        "sft.val_period=3",
    ]


@pytest.mark.slow
def test_weighted_mixture_resumes_bit_exact_after_sigkill(small_run, tmp_path: Path) -> None:
    """A 3:1 mixture killed with SIGKILL mid-run resumes with the same samples, losses and
    per-dataset validation losses as the uninterrupted run."""
    import os
    import signal

    from tests.conftest import read_metrics, wait_for_step

    more = mixture_overrides(small_run, tmp_path / "data")
    whole = small_run.inprocess(tmp_path / "whole", *more)
    assert whole.returncode == 0
    ref = whole.train_rows()
    assert sorted(ref) == list(range(1, 10))
    for step in ref:  # every step draws 12 from easy and 4 from hard
        assert (ref[step]["train/samples/easy"], ref[step]["train/samples/hard"]) == (12, 4)
    vals = {r["step"]: r for r in whole.metrics if "validation/val_loss" in r}
    assert sorted(vals) == [3, 6, 9]
    for row in vals.values():
        held, hard = row["validation/held/val_loss"], row["validation/hard_val/val_loss"]
        assert min(held, hard) < row["validation/val_loss"] < max(held, hard)
    info = ckpt.read_info(whole.checkpoint_dir / "step_9")
    assert info["val:held/val_loss"] == vals[9]["validation/held/val_loss"]

    work = tmp_path / "killed"
    proc = small_run.start(work, *more)
    wait_for_step(work / "logs", 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    latest = ckpt.latest_checkpoint(work / "ckpt")
    assert latest is not None
    start = int(latest.name.split("_")[1])
    state = torch.load(latest / "train_dataloader.pt", weights_only=True)
    assert set(state) == {"epoch", "position", "drawn"} and sum(state["drawn"]) == 16 * start
    resumed = small_run.inprocess(work, *more)
    assert resumed.returncode == 0
    got = resumed.train_rows()
    assert sorted(got) == list(range(start + 1, 10))
    for step in got:
        assert got[step] == {k: v for k, v in ref[step].items() if k in got[step]}, step
        assert {k for k in got[step] if k.startswith("train/samples/")} == {
            "train/samples/easy", "train/samples/hard",
        }  # fmt: skip
    resumed_vals = {
        r["step"]: r for r in read_metrics(resumed.exp_dir) if "validation/val_loss" in r
    }
    for step, row in resumed_vals.items():
        for key in (
            "validation/val_loss",
            "validation/held/val_loss",
            "validation/hard_val/val_loss",
        ):
            assert row[key] == vals[step][key], (step, key)
    weights = Path("policy/weights/model.safetensors")
    assert sha256(work / "ckpt" / "step_9" / weights) == sha256(
        whole.checkpoint_dir / "step_9" / weights
    )
