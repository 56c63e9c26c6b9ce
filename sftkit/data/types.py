"""What the data pipeline hands to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """One tokenized conversation.

    `loss_mask[i] == 1` when token `i` is a trained target (the loop shifts labels itself).
    """

    input_ids: list[int]
    loss_mask: list[int]
    task_name: str
    truncated: bool = False


@dataclass
class PreparedData:
    """Tokenized train and validation sets plus counts of what the length policy did.

    `report` keys are `<split>/<count>`, e.g. `train/examples`, `train/truncated`,
    `train/dropped_overlong`, `train/masked_overlong`, `train/dropped_untrainable`,
    `train/tokens`, `train/trained_tokens`, and `cache_hit` (1 when read from the cache).
    """

    train: list[Example]
    validation: list[Example]
    report: dict[str, int] = field(default_factory=dict)
