"""TrainState and the RNG snapshot: plain JSON / tensors, weights-only loadable, exact."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from sftkit.checkpoint.state import TrainState, rng_state, set_rng_state


def draws() -> tuple[float, float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(())), np.random.randn()


def test_rng_snapshot_restores_every_generator_through_weights_only_load() -> None:
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = draws()
    buffer.seek(0)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(buffer) == []
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert draws() == expected


def test_train_state_json_roundtrip_keeps_ranking_metric() -> None:
    state = TrainState(step=7, epoch=1, consumed_samples=112, total_valid_tokens=999,
                       metrics={"val:val_loss": 1.25})  # fmt: skip
    info = state.to_json()
    assert info["val:val_loss"] == 1.25 and info["total_steps"] == 7
    assert TrainState.from_json(info) == state
