"""A new stateful part (a counter) registered with a real Checkpointer, for
tests/integration/test_checkpoint_parts.py. Nothing in sftkit knows this class: the one
`register` call is the only change a new piece of checkpointed state needs.

    python counter_part.py TINY_MODEL_DIR CHECKPOINT_DIR RECORDS_DIR STEPS

saves a checkpoint after each of STEPS steps, first writing each step's counter state to
RECORDS_DIR/counter_N.pt (what a resume from step N must give back, bit for bit).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from sftkit.checkpoint.checkpointer import Checkpointer
from sftkit.checkpoint.state import TrainState
from sftkit.config import load_config
from sftkit.data.loader import GlobalBatchSampler
from sftkit.dist import DistEnv
from sftkit.model.build import build_model
from sftkit.train.optim import build_optimizer, build_scheduler

FINGERPRINT = {"model": "tiny", "seed": 3}


class Counter:
    """Steps counted and a float64 tensor drawn from the torch RNG at each step."""

    def __init__(self) -> None:
        self.count = 0
        self.values = torch.zeros(3, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "values": self.values}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.values = state["count"], state["values"]


def build(tiny_model_dir: Path, checkpoint_dir: Path) -> tuple[Checkpointer, Counter]:
    """A one-process Checkpointer over the tiny model, with a Counter registered."""
    from transformers import AutoTokenizer

    cfg = load_config(
        None,
        [
            f"policy.model_name={tiny_model_dir}",
            f"checkpointing.checkpoint_dir={checkpoint_dir}",
            "checkpointing.keep_top_k=null",
            "cluster.device=cpu",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg, DistEnv())
    optimizer = build_optimizer(model.parameters(), "torch.optim.AdamW", {"lr": 0.1})
    scheduler = build_scheduler(optimizer, cfg.policy.scheduler)
    sampler = GlobalBatchSampler(10, 2, True, 3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    checkpointer = Checkpointer(
        cfg, DistEnv(), model, optimizer, scheduler, sampler, tokenizer, None, FINGERPRINT
    )
    counter = Counter()
    checkpointer.register("counter", counter)  # the one line a new part needs
    return checkpointer, counter


def main(tiny_model_dir: Path, checkpoint_dir: Path, records: Path, steps: int) -> None:
    checkpointer, counter = build(tiny_model_dir, checkpoint_dir)
    records.mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        counter.count += 1
        counter.values = counter.values + torch.rand(3, dtype=torch.float64)
        torch.save(counter.state_dict(), records / f"counter_{step}.pt")
        checkpointer.save(TrainState(step=step, consumed_samples=2 * step))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
