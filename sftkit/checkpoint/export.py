"""`sftkit export <checkpoint> <out> [--adapter]`: any checkpoint to an HF directory.

The checkpoint's own `config.yaml` says which base model, tokenizer and LoRA settings it
was trained with, so no other input is needed. Full fine-tunes become an HF model
directory; LoRA runs become a merged HF directory, or with `--adapter` a PEFT adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sftkit.checkpoint import layout as ckpt
from sftkit.checkpoint.layout import StepDir
from sftkit.checkpoint.outputs import atomic_output_dir

logger = logging.getLogger("sftkit")


def export_checkpoint(
    checkpoint: Path, out: Path, adapter: bool = False, trust_remote_code: bool = False
) -> Path:
    """Write `out` from `checkpoint` (a step_N dir, or a checkpoint_dir: its latest).

    The checkpoint is untrusted input: its config.yaml asking for `trust_remote_code` (the
    model's own Python code) is refused unless the caller passes `trust_remote_code`."""
    from sftkit.checkpoint.weights import ModelPart
    from sftkit.config import load_config
    from sftkit.model.builtin import adapter_base_name
    from sftkit.model.load import load_model, save_hf
    from sftkit.model.lora import apply_lora, lora_spec_from_config, merge_lora, save_adapter

    if out.exists() and not _replaceable(out):
        raise ValueError(
            f"{out} exists and is not a model directory: export into a new or empty directory"
        )
    checkpoint = resolve_checkpoint(checkpoint)
    problem = ckpt.verify(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {problem}")
    step = StepDir(checkpoint)
    cfg = load_config(step.config, [])
    if cfg.policy.trust_remote_code and not trust_remote_code:
        raise ValueError(
            f"{checkpoint}/config.yaml sets policy.trust_remote_code=true: loading its model "
            f"runs Python code from {cfg.policy.model_name}; pass --trust-remote-code if you "
            "trust that code"
        )
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
    # A multi-rank checkpoint (policy/dcp) is consolidated here, in one process.
    ModelPart(model, trainable_only=spec is not None, world_size=1).load(step, rank=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(step.tokenizer)
    with atomic_output_dir(out) as tmp:  # a kill never leaves a half model at `out`
        if adapter:
            base = adapter_base_name(cfg.policy.model_name)  # loadable without sftkit
            save_adapter(model, tmp, base, spec)  # type: ignore[arg-type]
            tokenizer.save_pretrained(tmp)
        else:
            if spec is not None:
                merge_lora(model)
            save_hf(model, tokenizer, tmp)
    return out


def resolve_checkpoint(path: Path) -> Path:
    """`path` if it is a step_N directory, else the latest complete one inside it; a path
    that does not exist is said so, with the steps its parent holds (retention may have
    deleted the one asked for)."""
    if not path.exists():
        steps = [p.name for _, p in ckpt.step_dirs(path.parent)] if path.parent.is_dir() else []
        there = f"; {path.parent} holds {', '.join(steps)}" if steps else ""
        raise ValueError(f"{path} does not exist{there}")
    if StepDir(path).info.exists():
        return path
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} holds no complete checkpoint (step_N with a manifest)")
    return latest


def _replaceable(out: Path) -> bool:
    """An export replaces `out` as a whole: only an empty directory or an earlier export."""
    if out.is_symlink() or not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    return not names or bool(names & {"config.json", "adapter_config.json"})


def main(argv: list[str]) -> int:
    """`sftkit export` (errors: `sftkit.cli.export_main`)."""
    from sftkit.errors import ArgumentParser
    from sftkit.log import setup_logging

    parser = ArgumentParser(prog="sftkit export", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="checkpoint_dir/step_N (or checkpoint_dir)")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--adapter", action="store_true", help="write a PEFT adapter (LoRA runs)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a checkpoint whose config sets policy.trust_remote_code=true",
    )  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging()
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(checkpoint, args.out, args.adapter, args.trust_remote_code)
    kind = "a PEFT adapter" if args.adapter else "an HF model"
    print(f"exported {checkpoint.name} ({checkpoint}) as {kind} to {out}")
    return 0
