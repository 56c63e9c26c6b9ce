"""A run's state: `Run` (everything the loop touches), its resumable counters
(`TrainState`) and every RNG it depends on, in weights-only-loadable form."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sftkit.config import MasterConfig
from sftkit.data.loader import BatchPlan, GlobalBatchSampler
from sftkit.data.types import ExampleSet
from sftkit.dist import DistEnv
from sftkit.log import ConsoleReporter, Loggers
from sftkit.train.step import StepOptions
from sftkit.train.validation import Validator

if TYPE_CHECKING:  # the Checkpointer saves TrainState: imported for the annotation only
    from sftkit.train.checkpointer import Checkpointer


@dataclass
class TrainState:
    """Counters saved in `training_info.json` (NeMo RL's SFTSaveState plus sftkit fields)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch the next batch comes from
    consumed_samples: int = 0  # examples trained on so far, over all ranks
    total_valid_tokens: int = 0  # trained target tokens so far, over all ranks
    metrics: dict[str, float] = field(default_factory=dict)  # "val:val_loss", "train:loss", ...

    def to_json(self) -> dict[str, Any]:
        info = asdict(self)
        info.update(info.pop("metrics"))  # NeMo RL keys the ranking metric by its full name
        info["total_steps"] = self.step  # NeMo RL's name for the step counter
        return info

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> TrainState:
        metrics = {k: float(v) for k, v in info.items() if k.startswith(("val:", "train:"))}
        return cls(
            step=int(info.get("step", info.get("total_steps", 0))),
            epoch=int(info.get("epoch", 0)),
            consumed_samples=int(info.get("consumed_samples", 0)),
            total_valid_tokens=int(info.get("total_valid_tokens", 0)),
            metrics=metrics,
        )


@dataclass
class Run:
    """Everything the loop touches, built once by `sftkit.train.recipe.setup`."""

    cfg: MasterConfig
    env: DistEnv
    tokenizer: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LRScheduler
    sampler: GlobalBatchSampler
    plan: BatchPlan
    step_opts: StepOptions
    train_examples: ExampleSet
    validator: Validator
    state: TrainState
    checkpointer: Checkpointer
    loggers: Loggers
    console: ConsoleReporter
    total_steps: int
    deadline: float | None  # seconds from the start by which the last save must be done
    flops_per_token: float | None
    peak_flops: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors and plain Python values.

    NumPy's state is stored as a tensor plus ints, not as an ndarray: a pickled ndarray needs
    an allow-list under `torch.load(weights_only=True)` (the trl#3247 resume failure).
    """
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: (kind, keys, pos, has_gauss, cached)
    kind, keys, pos, has_gauss, cached = np_state
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
