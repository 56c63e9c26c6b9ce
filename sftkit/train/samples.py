"""Sample generations at validation (`logger.num_val_samples_to_print: N`, NeMo RL GRPO's key).

At each validation the first N validation rows get greedy completions of up to
`logger.val_sample_max_new_tokens` new tokens: printed, written to `val_samples.jsonl`
beside `metrics.jsonl` (one record per sample: step, prompt, reference, generated) and
logged to the trackers (a wandb table, TensorBoard text).

Every rank runs every forward pass (a sharded model's forward is collective), and rank 0's
token is broadcast at each step, so all ranks stop together and none waits forever.
Decoding recomputes the whole sequence each step (no KV cache): N and the token budget are
small, and it works for every sharding sftkit applies.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sftkit.data.types import Example
from sftkit.dist import DistEnv
from sftkit.train.step import autocast

logger = logging.getLogger("sftkit")


def split_example(example: Example) -> tuple[list[int], list[int]]:
    """(prompt tokens: everything before the first trained token, reference: trained tokens)."""
    mask = example.loss_mask
    first = next((i for i, m in enumerate(mask) if m), len(mask))
    reference = [t for t, m in zip(example.input_ids, mask, strict=True) if m]
    return example.input_ids[:first], reference


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    stop_ids: set[int],
    env: DistEnv,
    dtype: torch.dtype,
) -> list[int]:
    """Greedy continuation of `prompt`; every rank calls it with the same arguments."""
    ids = torch.tensor([prompt], dtype=torch.long, device=env.device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        with autocast(env.device, dtype):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        if hasattr(logits, "full_tensor"):  # a tensor-parallel DTensor
            logits = logits.full_tensor()
        token = logits.float().argmax(dim=-1)
        if env.initialized:  # the same token on every rank: all stop at the same step
            dist.broadcast(token, src=0)
        value = int(token.item())
        if value in stop_ids:
            break
        new.append(value)
        ids = torch.cat([ids, token.view(1, 1).to(ids.dtype)], dim=1)
    return new


def val_samples(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    step: int,
    env: DistEnv,
    dtype: torch.dtype,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """Records `{step, prompt, reference, generated}` for `examples` (all ranks compute)."""
    stop_ids = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    was_training = model.training
    model.eval()
    records = []
    try:
        for example in examples:
            prompt, reference = split_example(example)
            if not prompt:
                continue
            generated = greedy_generate(model, prompt, max_new_tokens, stop_ids, env, dtype)
            records.append(
                {
                    "step": step,
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "reference": tokenizer.decode(reference, skip_special_tokens=True),
                    "generated": tokenizer.decode(generated, skip_special_tokens=True),
                }
            )
    finally:
        model.train(was_training)
    return records


def print_samples(records: list[dict[str, Any]], step: int) -> None:
    """One log entry per sample: prompt, reference and generation."""
    for k, record in enumerate(records):
        logger.info(
            "val sample %d/%d at step %d\n  prompt:    %r\n  reference: %r\n  generated: %r",
            k + 1, len(records), step, record["prompt"], record["reference"], record["generated"],
        )  # fmt: skip
