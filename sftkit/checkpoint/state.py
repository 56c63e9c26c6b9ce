"""The run's resumable counters (`TrainState`), every RNG it depends on (`RngState`), and
the non-finite guard a save passes first: the small stateful parts of a checkpoint."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sftkit.errors import NonFiniteError


@dataclass
class TrainState:
    """Counters saved in `training_info.json` (NeMo RL's SFTSaveState plus sftkit fields)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch the next batch comes from
    consumed_samples: int = 0  # examples trained on so far, over all ranks
    total_valid_tokens: int = 0  # trained target tokens so far, over all ranks
    metrics: dict[str, float] = field(default_factory=dict)  # "val:val_loss", "train:loss", ...
    validation_due: bool = False  # a stop skipped the validation due at `step`: resume runs it

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
            validation_due=bool(info.get("validation_due", False)),
        )

    def state_dict(self) -> dict[str, Any]:
        return self.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place (the loop holds this object), from `training_info.json`'s contents."""
        loaded = TrainState.from_json(state)
        for name in ("step", "epoch", "consumed_samples", "total_valid_tokens", "metrics",
                     "validation_due"):  # fmt: skip
            setattr(self, name, getattr(loaded, name))


class RngState:
    """Every RNG of this process (Python, NumPy, torch CPU and CUDA) as a stateful part."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


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


def check_finite_weights(
    params: Iterable[Any], step: int, agree: Callable[[float], float] = lambda x: x
) -> None:
    """Raise NonFiniteError when any parameter holds inf/NaN (before a save, never per step).

    One fused max-abs reduction over this rank's shards and one host read; `agree` (the
    run's max over ranks) makes every rank stop together. `lr=1e30 weight_decay=1e12` turns
    the weights non-finite in the update after a finite loss: without this check `step_1`
    held them and resuming repeated the failure.
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    # A frozen NF4 base (QLoRA) is never updated and has no inf/NaN encoding: skipped.
    tensors = [t.detach() for t in local if t.numel() > 0 and type(t).__name__ != "NF4Tensor"]
    bad = 0.0
    if tensors:
        peaks = torch._foreach_norm(tensors, float("inf"))
        bad = float((~torch.isfinite(torch.stack([p.float() for p in peaks]))).sum())
    bad = agree(bad)
    if bad:
        raise NonFiniteError(
            f"non-finite weights after step {step} ({int(bad)} parameter tensors hold inf/NaN); "
            "not saved, so the previous checkpoint stays the resume point. Lower "
            "policy.optimizer.kwargs.lr or weight_decay, or use policy.precision=float32."
        )
