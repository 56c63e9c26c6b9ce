"""`sftkit export <checkpoint> <out> [--adapter]`: any checkpoint to an HF directory.

The checkpoint's own `config.yaml` says which base model, tokenizer and LoRA settings it
was trained with, so no other input is needed. Full fine-tunes become an HF model
directory; LoRA runs become a merged HF directory, or with `--adapter` a PEFT adapter.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from sftkit.train import checkpoint as ckpt

logger = logging.getLogger("sftkit")


def export_checkpoint(checkpoint: Path, out: Path, adapter: bool = False) -> Path:
    """Write `out` from `checkpoint` (a step_N dir, or a checkpoint_dir: its latest)."""
    from sftkit.config import load_config
    from sftkit.model.builtin import adapter_base_name
    from sftkit.model.load import load_model, load_model_weights, save_hf
    from sftkit.model.lora import apply_lora, lora_spec_from_config, merge_lora, save_adapter

    if not (checkpoint / ckpt.INFO).exists():
        latest = ckpt.latest_checkpoint(checkpoint)
        if latest is None:
            raise ValueError(f"{checkpoint} holds no complete checkpoint (step_N with a manifest)")
        checkpoint = latest
    problem = ckpt.verify(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {problem}")
    cfg = load_config(checkpoint / "config.yaml", [])
    model = load_model(
        cfg.policy.model_name,
        trust_remote_code=cfg.policy.trust_remote_code,
        config_overrides=dict(cfg.policy.hf_config_overrides or {}),
    )
    spec = lora_spec_from_config(cfg.policy)
    if spec is not None:
        apply_lora(model, spec)
    elif adapter:
        raise ValueError(f"{checkpoint} is a full fine-tune; --adapter needs a LoRA run")
    sharded = checkpoint / "policy" / "dcp"
    if sharded.is_dir():  # a multi-rank checkpoint: consolidated here, in one process
        from sftkit.dist import load_sharded

        load_sharded(model, None, sharded, trainable_only=spec is not None)
    else:
        load_model_weights(model, checkpoint / "policy" / "weights")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "policy" / "tokenizer")
    if adapter:
        base = adapter_base_name(cfg.policy.model_name)  # loadable without sftkit
        save_adapter(model, out, base, spec)  # type: ignore[arg-type]
        tokenizer.save_pretrained(out)
    else:
        if spec is not None:
            merge_lora(model)
        save_hf(model, tokenizer, out)
    return out


def gather_hf(
    model: nn.Module, tokenizer: Any, directory: Path, is_main: bool, merge_lora: bool
) -> None:
    """An HF directory of a sharded (FSDP2/TP) model: the full state dict is gathered to
    rank 0's CPU and written there. Collective: every rank calls; the model is unchanged.

    LoRA layers are merged into the written weights when `merge_lora` (W + scale * B @ A)
    and left out otherwise.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from sftkit.model.lora import lora_modules

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    if not is_main:
        return
    for name, module in lora_modules(model).items():
        a, b = state.pop(f"{name}.lora_A.weight"), state.pop(f"{name}.lora_B.weight")
        if merge_lora:
            weight = state[f"{name}.weight"]
            delta = module.lora_scale * (b.float() @ a.float())
            state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    save_hf_state_dict(model, state, tokenizer, directory)


def save_hf_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, directory: Path
) -> None:
    """Write `state` as the HF model directory of `model` (config, safetensors, tokenizer)."""
    import copy

    from huggingface_hub import save_torch_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    config: Any = copy.deepcopy(model.config)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the input embeddings
    save_torch_state_dict(state, directory)
    # FSDP2 subclasses the model class on the fly (`FSDPLlamaForCausalLM`): name the original.
    original = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers"))
    config.architectures = [original.__name__]
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def main(argv: list[str]) -> int:
    from sftkit.log import setup_logging

    parser = argparse.ArgumentParser(prog="sftkit export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="checkpoint_dir/step_N (or checkpoint_dir)")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--adapter", action="store_true", help="write a PEFT adapter (LoRA runs)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.adapter)
    except ValueError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0
