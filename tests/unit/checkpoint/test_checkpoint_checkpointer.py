"""The Checkpointer on one process: what `save` writes, `load` brings back exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.checkpointer import Checkpointer, pick_resume_dir
from sftkit.checkpoint.state import TrainState
from sftkit.config import load_config
from sftkit.data.loader import GlobalBatchSampler
from sftkit.dist import DistEnv
from sftkit.model.build import build_model
from sftkit.model.lora import lora_spec_from_config
from sftkit.train.optim import build_optimizer, build_scheduler

ENV = DistEnv()
FINGERPRINT = {"model": "tiny", "seed": 1}
LORA = ["policy.dtensor_cfg.lora_cfg.enabled=true"]


def checkpointer(tiny_model_dir: Path, work: Path, seed: int, *more: str) -> Checkpointer:
    from transformers import AutoTokenizer

    cfg = load_config(
        None,
        [
            f"policy.model_name={tiny_model_dir}",
            f"checkpointing.checkpoint_dir={work}",
            "checkpointing.keep_top_k=null",
            "cluster.device=cpu",
            *more,
        ],
    )
    torch.manual_seed(seed)  # LoRA's init: a different seed gives different weights
    model = build_model(cfg, ENV)
    optimizer = build_optimizer(model.parameters(), "torch.optim.AdamW", {"lr": 0.1})
    scheduler = build_scheduler(optimizer, cfg.policy.scheduler)  # warmup + cosine
    sampler = GlobalBatchSampler(10, 2, True, seed)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = lora_spec_from_config(cfg.policy)
    return Checkpointer(
        cfg, ENV, model, optimizer, scheduler, sampler, tokenizer, spec, FINGERPRINT
    )


def train_one_step(c: Checkpointer) -> None:
    ids = torch.tensor([[1, 5, 7, 9, 11, 2]])
    c.model(input_ids=ids, labels=ids).loss.backward()
    c.optimizer.step()
    c.scheduler.step()
    c.sampler.next_batch()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_save_then_load_restores_every_piece_of_state(
    tiny_model_dir: Path, tmp_path: Path, lora: bool
) -> None:
    more = LORA if lora else []
    saved = checkpointer(tiny_model_dir, tmp_path, 0, *more)
    train_one_step(saved)
    state = TrainState(step=3, consumed_samples=6, total_valid_tokens=40)
    state.metrics = {"train:loss": 1.5}
    path = saved.save(state)
    after_save = torch.rand(4)  # the RNG stream right after the save, as a resume sees it

    assert path == tmp_path / "step_3" and ckpt.verify(path) is None
    weights = "trainable" if lora else "model"
    assert (path / "policy" / "weights" / f"{weights}.safetensors").is_file()

    fresh = checkpointer(tiny_model_dir, tmp_path, 1, *more)
    assert fresh.load() == TrainState()  # nothing picked: a fresh start
    pairs = list(zip(saved.model.parameters(), fresh.model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in pairs)  # so the load below has work to do
    fresh.resume_dir, _ = pick_resume_dir(fresh.cfg.checkpointing, FINGERPRINT, ENV)
    assert fresh.resume_dir == path
    restored = fresh.load()

    assert restored == state
    assert torch.equal(torch.rand(4), after_save)
    assert all(torch.equal(a, b) for a, b in pairs)
    for a, b in zip(saved.optimizer.state.values(), fresh.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq")), a.keys()
    assert fresh.scheduler.state_dict() == saved.scheduler.state_dict()
    assert fresh.sampler.state_dict() == saved.sampler.state_dict()


def test_a_different_fingerprint_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    saved = checkpointer(tiny_model_dir, tmp_path, 0)
    saved.save(TrainState(step=1))
    with pytest.raises(ckpt.ResumeMismatchError, match="seed: checkpoint has 1, this run has 2"):
        pick_resume_dir(saved.cfg.checkpointing, {**FINGERPRINT, "seed": 2}, ENV)


def test_should_save_periods_last_step_and_stopping(tiny_model_dir: Path, tmp_path: Path) -> None:
    c = checkpointer(tiny_model_dir, tmp_path, 0, "checkpointing.save_period=3")
    assert [s for s in range(1, 8) if c.should_save(s, last_step=s == 7)] == [3, 6, 7]
    assert c.should_save(4, last_step=False, stopping=True)
    c.cfg.checkpointing.enabled = False
    assert not c.should_save(3, last_step=True, stopping=True)


def test_fingerprint_hides_secrets_in_model_and_tokenizer_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """training_info.json is written as is: a URL password or an environment secret inside a
    model or tokenizer path must not reach it, and the resume check still compares alike."""
    from sftkit.checkpoint.checkpointer import resume_fingerprint
    from sftkit.data.types import ExampleSet, PreparedData

    monkeypatch.setenv("MODEL_STORE_TOKEN", "tok-0123456789abcdef")
    cfg = load_config(
        Path(__file__).parents[3] / "examples" / "configs" / "quickstart.yaml",
        [
            "policy.model_name=https://bob:pw-417x@models.example.com/m",
            "policy.tokenizer.name=/data/tok-0123456789abcdef/tokenizer",
        ],
    )
    data = PreparedData(ExampleSet.empty(), ExampleSet.empty())
    fingerprint = resume_fingerprint(cfg, None, data)
    text = str(fingerprint)
    assert "pw-417x" not in text and "tok-0123456789abcdef" not in text
    assert fingerprint["model"] == "https://bob:***@models.example.com/m"
    assert fingerprint == resume_fingerprint(cfg, None, data)


FORMAT1 = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints" / "format1_lora"
# The LoRA settings the fixture was trained with (rank 1 on q_proj keeps it at 60 KB).
FORMAT1_LORA = [
    *LORA,
    "policy.dtensor_cfg.lora_cfg.dim=1",
    "policy.dtensor_cfg.lora_cfg.match_all_linear=false",
    "policy.dtensor_cfg.lora_cfg.target_modules=[q_proj]",
]


def test_a_format_1_checkpoint_from_before_the_registry_still_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """tests/fixtures/checkpoints/format1_lora was written by `sftkit.train.checkpointer` at
    ea88fda, before the checkpoint became a registry of parts (two LoRA steps, then a save at
    step 2, then `torch.rand(4)` recorded in expected.json). Every part loads from it."""
    from safetensors.torch import load_file

    shutil.copytree(FORMAT1 / "step_2", tmp_path / "step_2")
    expected = json.loads((FORMAT1 / "expected.json").read_text())
    step = tmp_path / "step_2"
    assert ckpt.verify(step) is None
    assert "parts" not in json.loads((step / ckpt.MANIFEST).read_text())  # written before them

    fresh = checkpointer(tiny_model_dir, tmp_path, 1, *FORMAT1_LORA)
    fresh.resume_dir, _ = pick_resume_dir(fresh.cfg.checkpointing, FINGERPRINT, ENV)
    assert fresh.resume_dir == step
    state = fresh.load()

    assert state == TrainState(2, 0, 4, 12, {"train:loss": 2.5})
    assert torch.equal(torch.rand(4), torch.tensor(expected["rand_after_load"]))
    saved = load_file(str(step / "policy" / "weights" / "trainable.safetensors"))
    params = dict(fresh.model.named_parameters())
    assert saved and all(torch.equal(params[name], value) for name, value in saved.items())
    optimizer = torch.load(step / "policy" / "optimizer" / "optimizer.pt", weights_only=True)
    restored = fresh.optimizer.state_dict()["state"]
    assert set(restored) == set(optimizer["state"]) and optimizer["state"]
    for index, moments in optimizer["state"].items():
        assert all(torch.equal(restored[index][k], moments[k]) for k in ("exp_avg", "exp_avg_sq"))
    scheduler = torch.load(step / "policy" / "optimizer" / "scheduler.pt", weights_only=True)
    assert fresh.scheduler.state_dict() == scheduler
    assert fresh.sampler.state_dict() == expected["sampler"]


class Counter:
    def __init__(self, count: int = 0) -> None:
        self.count = count

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def test_a_registered_part_is_saved_listed_and_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    saved = checkpointer(tiny_model_dir, tmp_path, 0)
    saved.register("counter", Counter(7))
    saved.register("per_rank", Counter(9), per_rank=True)
    with pytest.raises(ValueError, match="'counter' is already registered"):
        saved.register("counter", Counter())
    path = saved.save(TrainState(step=1))
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    parts = ["counter", "model", "optimizer", "per_rank", "rng", "sampler", "scheduler"]
    assert manifest["parts"] == sorted([*parts, "train_state"])
    assert {"state/counter.pt", "state/per_rank/rank_0.pt"} <= set(manifest["files"])

    fresh = checkpointer(tiny_model_dir, tmp_path, 1)
    counter, per_rank = Counter(), Counter()
    fresh.register("counter", counter)
    fresh.register("per_rank", per_rank, per_rank=True)
    fresh.register("absent_ok", Counter(5), optional=True)
    fresh.resume_dir = path
    fresh.load()
    assert (counter.count, per_rank.count) == (7, 9)

    fresh.register("absent", Counter())
    with pytest.raises(ckpt.ResumeMismatchError, match=r"no state/absent.pt: .* 'absent' state"):
        fresh.load()


def test_unmeasured_metric_warned_once_and_not_at_the_last_save(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    c = checkpointer(tiny_model_dir, tmp_path, 0, "checkpointing.keep_top_k=3")
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        c.save(TrainState(step=2), last=True)  # a final or preemption save: the latest
        assert "not measured" not in caplog.text
        c.save(TrainState(step=4))  # periodic without validation: the config's mismatch
        c.save(TrainState(step=6))
    assert caplog.text.count("not measured") == 1 and "at step 4" in caplog.text
